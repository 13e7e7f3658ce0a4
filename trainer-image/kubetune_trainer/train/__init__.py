"""The `train` step: Composer training of a Hugging Face causal LM on the prepared data.

Public API: `run_train(config) -> {"latestCheckpoint", "mlflow": {"experimentId", "runId"}}`;
`build(config)` returns the assembled Trainer without running it (tests, tools).
"""

from .trainer import build, run_train

__all__ = ["build", "run_train"]
