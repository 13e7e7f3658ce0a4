"""Data preparation: read, validate, tokenize, pack and write the training data (SPEC §4).

Public API: `run_prepare(config) -> dict` (the `prepare` step), `analyze(config) -> PrepReport`
(the `kubetune validate` pre-flight, writes nothing), and `store.open_split(path)` for training.
"""

from .analysis import analyze
from .prepare import run_prepare
from .report import DataStats, PrepFailed, PrepReport

__all__ = ["DataStats", "PrepFailed", "PrepReport", "analyze", "run_prepare"]
