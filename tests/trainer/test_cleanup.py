"""`cleanup --work-dir`: a deleted run's folder goes, and nothing beside it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_cleanup_removes_the_run_folder_and_nothing_else(tmp_path):
    root = tmp_path / "storage" / "team"
    run, other = root / "demo", root / "other"
    for folder in (run / "data" / "train", run / "checkpoints", other / "data"):
        folder.mkdir(parents=True)
    (run / "checkpoints" / "ep0-ba1-rank0.pt").write_bytes(b"x" * 10)
    (run / "checkpoints" / "latest-rank0.pt").symlink_to("ep0-ba1-rank0.pt")
    (other / "data" / "_SUCCESS").write_text("{}")
    result = tmp_path / "result.json"

    def cleanup():
        return subprocess.run([sys.executable, "-m", "kubetune_trainer", "cleanup", "--work-dir", str(run)],
                              env={"KUBETUNE_TERMINATION_LOG": str(result), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60)

    done = cleanup()
    assert done.returncode == 0, done.stderr
    assert not run.exists() and (other / "data" / "_SUCCESS").exists()
    assert json.loads(result.read_text())["ok"] is True
    assert cleanup().returncode == 0  # what is gone is done


@pytest.mark.parametrize("work_dir", ["", "/", "storage"])
def test_cleanup_refuses_what_is_not_a_run_folder(work_dir):
    from kubetune_trainer.cleanup import run_cleanup
    from kubetune_trainer.errors import UserError

    with pytest.raises(UserError):
        run_cleanup(work_dir)
