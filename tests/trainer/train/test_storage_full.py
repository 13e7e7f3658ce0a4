"""Storage full during training: the step fails with a clear, permanent StorageFull, and every
checkpoint saved before stays whole (the work_dir lies on a small tmpfs that fills mid-run)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from composer.core import Callback

from kubetune_trainer import checkpoints
from kubetune_trainer.errors import StorageFull, storage_full
from kubetune_trainer.results import exit_code
from kubetune_trainer.train import run_train

LEFT_FREE = 256 * 1024  # room for progress.json, not for a checkpoint of the tiny model (~1.3 MB)


@pytest.fixture
def small_volume(tmp_path):
    """A 64 MiB tmpfs of its own (as root: the machines these tests run on are)."""
    mount = tmp_path / "volume"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


class FillStorage(Callback):
    """After batch 3 (past the checkpoint of batch 2) fills the volume but LEFT_FREE bytes."""

    def __init__(self, volume: Path):
        self.volume = volume

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == 3:
            stats = os.statvfs(self.volume)
            with open(self.volume / "filler", "wb") as filler:
                filler.truncate(0)
                filler.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - LEFT_FREE))


def test_a_full_volume_fails_the_step_as_storage_full_and_keeps_the_saved_checkpoint(
        make_config, small_volume):
    config = make_config()
    work = small_volume / "work"
    shutil.copytree(config.work_dir, work)  # the prepared data
    config = config.model_copy(update={"work_dir": str(work)}).model_copy(
        update={"training_duration": "4ba", "save_interval": "2ba"})
    with pytest.raises(StorageFull) as error:
        run_train(config, callbacks=[FillStorage(small_volume)])
    assert error.value.reason == "StorageFull" and exit_code(error.value) == 2  # permanent: not retried
    assert error.value.message.startswith(f"no space left on the storage of {work} (a checkpoint write failed)")
    assert "checkpoints saved before are kept" in error.value.message
    folder = Path(config.checkpoint_dir)
    point = checkpoints.resume_point(folder)
    assert point.checkpoint == folder / "ep0-ba2-rank0.pt" and point.note is None
    assert checkpoints.defect(point.checkpoint) is None


def test_a_full_disk_is_recognised_through_the_causes_and_only_when_full(tmp_path):
    wrapped = RuntimeError("checkpoint upload failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    full = storage_full(wrapped, str(tmp_path))
    assert full is not None and "(No space left on device)" in full.message and full.permanent
    # torch's writer says only that a write failed: with room to spare it is not a full disk
    assert storage_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
                        str(tmp_path)) is None
    assert storage_full(ValueError("bad input"), str(tmp_path)) is None
