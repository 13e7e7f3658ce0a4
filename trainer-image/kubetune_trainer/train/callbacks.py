"""Composer callbacks tied to checkpoints: who hears about a new one, and eval-prompt generations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from composer.callbacks import CheckpointSaver, Generate
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from .. import checkpoints
from ..storage import Mirror, storage_errors

# The managed service's sampling settings for evalPrompts.
GENERATION = {"max_new_tokens": 100, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "do_sample": True}


class AfterCheckpoint(Callback):
    """Runs `after_save` at each of the events where Composer's CheckpointSaver may have saved.

    Must come after the CheckpointSaver in the callback list: callbacks run in list order."""

    def after_save(self) -> None:
        raise NotImplementedError

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self.after_save()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self.after_save()

    def iteration_checkpoint(self, state: State, logger: Logger) -> None:
        self.after_save()


class CheckpointWatcher(AfterCheckpoint):
    """Calls listeners with the new checkpoint's path after the saver wrote one (rank 0); at
    the start, with the checkpoint a resumed run starts from."""

    def __init__(self, saver: CheckpointSaver, listeners: Sequence[Callable[[str], None]],
                 resumed_from: Path | None = None):
        self.saver, self.listeners = saver, tuple(listeners)
        self.resumed_from = resumed_from
        self._reported: Path | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.report(self.resumed_from)

    def after_save(self) -> None:
        self.report(checkpoints.latest(self.saver.folder))

    def report(self, current: Path | None) -> None:
        if current is not None and current != self._reported:
            self._reported = current
            for listener in self.listeners:
                listener(str(current))


class CheckpointUploader(AfterCheckpoint):
    """Pushes each new checkpoint to the object store that the work_dir mirrors, before anyone
    hears of it: every pod's local rank 0 uploads what its ranks wrote, then rank 0 moves the
    `latest` pointer, so the pointer never names a checkpoint that is not all there.

    Must come right after the CheckpointSaver: callbacks run in list order."""

    def __init__(self, saver: CheckpointSaver, mirror: Mirror):
        self.saver, self.mirror = saver, mirror
        # The batch of the saver's last save: set on every rank (saved_checkpoints grows only on
        # ranks that wrote a file), so all ranks agree on when to meet at the barriers below.
        self._synced: Any = None

    def fit_end(self, state: State, logger: Logger) -> None:
        self.after_save()  # the saver's final checkpoint

    def after_save(self) -> None:
        if self.saver.last_checkpoint_batch == self._synced:
            return
        self._synced = self.saver.last_checkpoint_batch
        with storage_errors(self.mirror.remote):
            dist.barrier()  # every rank has written its part
            if dist.get_local_rank() == 0:
                self.mirror.push("checkpoints")
            dist.barrier()  # every pod has uploaded
            if dist.get_global_rank() == 0:
                self.mirror.push_pointer(checkpoints.LATEST_PATH)


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


def weights_digest(model) -> str:
    """A digest of every parameter and buffer: equal on all ranks iff they hold the same model."""
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


class WeightsDigest(Callback):
    """Each rank records `result/weights-rank{r}.json` {initial, final, batches}, so data-parallel
    ranks that drifted apart (a broken all-reduce, a mismatched rank) are visible after the run."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.initial: str | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.initial = weights_digest(state.model)

    def fit_end(self, state: State, logger: Logger) -> None:
        from composer.utils import dist

        self.folder.mkdir(parents=True, exist_ok=True)
        document = {"initial": self.initial, "final": weights_digest(state.model),
                    "batches": int(state.timestamp.batch)}
        (self.folder / f"weights-rank{dist.get_global_rank()}.json").write_text(json.dumps(document))
