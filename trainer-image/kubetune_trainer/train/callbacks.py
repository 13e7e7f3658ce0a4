"""Composer callbacks tied to checkpoints: who hears about a new one, and eval-prompt generations."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from composer.callbacks import CheckpointSaver, Generate
from composer.core import Callback, State
from composer.loggers import Logger

LATEST = "latest-rank0.pt"
# The managed service's sampling settings for evalPrompts.
GENERATION = {"max_new_tokens": 100, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "do_sample": True}


def latest_checkpoint(folder: str | Path) -> str | None:
    """The checkpoint (file, or folder of shards) that rank 0's `latest` pointer names."""
    pointer = Path(folder) / LATEST
    return str(pointer.resolve()) if pointer.is_symlink() and pointer.exists() else None


class CheckpointWatcher(Callback):
    """Calls listeners with the new checkpoint's path after the saver wrote one (rank 0).

    Must come after the CheckpointSaver in the callback list: callbacks run in list order."""

    def __init__(self, saver: CheckpointSaver, listeners: list[Callable[[str], None]]):
        self.saver, self.listeners = saver, listeners
        self._reported: str | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.report()  # a resumed run starts from a checkpoint already

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self.report()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self.report()

    def iteration_checkpoint(self, state: State, logger: Logger) -> None:
        self.report()

    def report(self) -> None:
        current = latest_checkpoint(self.saver.folder)
        if current is not None and current != self._reported:
            self._reported = current
            for listener in self.listeners:
                listener(current)


class _BatchColumn:
    """A Logger stand-in that adds the batch to every generations row, so the rows of all
    checkpoints in the one MLflow table (log_table appends) say which checkpoint they are from."""

    def __init__(self, logger: Logger, batch: int):
        self.logger, self.batch = logger, batch

    def log_table(self, columns: list[str], rows: list[list[Any]], name: str = "Table",
                  **kwargs: Any) -> None:
        self.logger.log_table(columns=["batch", *columns], rows=[[self.batch, *row] for row in rows],
                              name=name, **kwargs)


class CheckpointGenerations(Generate):
    """Composer's Generate on the checkpoint schedule (it fires at the same interval, end of
    training included); every rank takes part, as FSDP's sharded generate requires."""

    def __init__(self, prompts: list[str], interval: str):
        super().__init__(prompts, interval=interval, **GENERATION)

    def generate(self, state: State, logger: Logger):
        super().generate(state, _BatchColumn(logger, int(state.timestamp.batch)))  # type: ignore[arg-type]
