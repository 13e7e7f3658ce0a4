"""The object-store mirror of a work_dir (fsspec's in-memory store here; S3 in the run tests)."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest

from kubetune_trainer.config import RunConfig, is_object_store
from kubetune_trainer.errors import StepError, TransientError, UserError
from kubetune_trainer.contract import ENV_SCRATCH_DIR
from kubetune_trainer.storage import Mirror, stage_dir, staged, storage_errors


@pytest.fixture
def remote():
    return f"memory://runs-{uuid.uuid4().hex[:8]}/team/run"


@pytest.fixture
def memory():
    return fsspec.filesystem("memory")


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_only_scheme_uris_other_than_file_are_object_stores():
    assert is_object_store("s3://bucket/runs") and is_object_store("gs://b/p")
    assert not is_object_store("/data/runs") and not is_object_store("file:///data/runs")


def test_push_uploads_what_changed_and_pull_downloads_what_is_missing(tmp_path, remote, memory):
    up = Mirror(remote, tmp_path / "a")
    write(up.local / "data" / "train" / "input_ids.npy", "x" * 10)
    write(up.local / "data" / "stats.json", "{}")
    assert up.push("data") == 2
    assert up.push("data") == 0  # same sizes: nothing to send again
    write(up.local / "data" / "stats.json", '{"samples": 3}')
    assert up.push("data") == 1

    down = Mirror(remote, tmp_path / "b")
    assert down.pull("data") == 2 and down.pull("data") == 0
    assert (down.local / "data" / "stats.json").read_text() == '{"samples": 3}'
    assert down.pull("hf") == 0  # nothing there yet is not an error


def test_completion_markers_are_uploaded_after_everything_else(tmp_path, remote, monkeypatch):
    mirror = Mirror(remote, tmp_path / "a")
    for name in ("_SUCCESS", "a.npy", "z.npy"):
        write(mirror.local / "data" / name, name)
    order = []
    put = mirror.fs.put
    monkeypatch.setattr(mirror.fs, "put", lambda sources, targets, **kw: (order.append(list(targets)),
                                                                         put(sources, targets, **kw)))
    mirror.push("data")
    assert [[t.rsplit("/", 1)[1] for t in batch] for batch in order] == [["a.npy", "z.npy"], ["_SUCCESS"]]


def test_a_latest_link_travels_as_a_symlink_object_and_comes_back_as_a_link(tmp_path, remote, memory):
    up = Mirror(remote, tmp_path / "a")
    write(up.local / "checkpoints" / "ep0-ba2-rank0.pt", "old")
    write(up.local / "checkpoints" / "ep0-ba4-rank0.pt", "new!")
    (up.local / "checkpoints" / "latest-rank0.pt").symlink_to("ep0-ba4-rank0.pt")
    assert up.push("checkpoints") == 2  # the link itself is not uploaded as a copy
    assert up.push_pointer("checkpoints/latest-rank0.pt") == "ep0-ba4-rank0.pt"
    assert memory.cat_file(f"{up.root}/checkpoints/latest-rank0.pt.symlink") == b"ep0-ba4-rank0.pt"

    down = Mirror(remote, tmp_path / "b")
    assert down.pull_pointer("checkpoints/latest-rank0.pt") == "ep0-ba4-rank0.pt"
    link = down.local / "checkpoints" / "latest-rank0.pt"
    assert link.is_symlink() and link.read_text() == "new!"
    assert not (down.local / "checkpoints" / "ep0-ba2-rank0.pt").exists()  # only what it names


def test_no_remote_pointer_removes_a_stale_local_link(tmp_path, remote):
    mirror = Mirror(remote, tmp_path / "a")
    write(mirror.local / "checkpoints" / "ep9-ba9-rank0.pt", "stale")
    (mirror.local / "checkpoints" / "latest-rank0.pt").symlink_to("ep9-ba9-rank0.pt")
    assert mirror.pull_pointer("checkpoints/latest-rank0.pt") is None
    assert not (mirror.local / "checkpoints" / "latest-rank0.pt").exists()


@pytest.mark.parametrize("target", ["../../elsewhere.pt", "/etc/passwd", ""])
def test_a_pointer_naming_something_outside_its_folder_is_refused(tmp_path, remote, memory, target):
    mirror = Mirror(remote, tmp_path / "a")
    memory.pipe_file(f"{mirror.root}/checkpoints/latest-rank0.pt.symlink", target.encode())
    with pytest.raises(UserError, match="latest-rank0.pt.symlink"):
        mirror.pull_pointer("checkpoints/latest-rank0.pt")


def test_a_pointer_to_a_deleted_checkpoint_is_an_error_not_a_fresh_start(tmp_path, remote, memory):
    mirror = Mirror(remote, tmp_path / "a")
    memory.pipe_file(f"{mirror.root}/checkpoints/latest-rank0.pt.symlink", b"ep0-ba2-rank0.pt")
    with pytest.raises(UserError, match="not found"):
        with storage_errors(remote):
            mirror.pull_pointer("checkpoints/latest-rank0.pt")


def config(work_dir: str) -> RunConfig:
    return RunConfig(run_name="r", run_uid="u", model="m", train_data_path="d", work_dir=work_dir,
                     experiment_path="/e", register_to="a.b.c")


def test_a_mounted_work_dir_is_used_in_place(tmp_path):
    original = config(str(tmp_path))
    with staged("prepare", original) as local:
        assert local is original and local.published(local.data_dir) == local.data_dir


def test_a_step_runs_on_a_staging_copy_and_its_outputs_are_pushed_on_success(tmp_path, remote, memory,
                                                                             monkeypatch):
    monkeypatch.setenv(ENV_SCRATCH_DIR, str(tmp_path / "scratch"))
    with staged("convert", config(remote)) as local:
        assert local.work_dir == str(stage_dir(remote).resolve()) and local.remote_work_dir == remote
        assert local.storage_uri(local.hf_dir) == f"{remote}/hf" == local.published(local.hf_dir)
        assert local.published(local.work_dir + "-elsewhere") == local.work_dir + "-elsewhere"
        assert "remote_work_dir" not in json.loads(local.model_dump_json())  # never in a rendered config
        write(tmp_path / "scratch" / stage_dir(remote).name / "hf" / "model.safetensors", "w")
    assert memory.exists(f"{remote.removeprefix('memory://')}/hf/model.safetensors")


def test_a_failed_step_pushes_nothing(tmp_path, remote, memory, monkeypatch):
    monkeypatch.setenv(ENV_SCRATCH_DIR, str(tmp_path / "scratch"))
    with pytest.raises(RuntimeError):
        with staged("convert", config(remote)):
            write(tmp_path / "scratch" / stage_dir(remote).name / "hf" / "half.safetensors", "w")
            raise RuntimeError("killed mid-conversion")
    assert not memory.exists(f"{remote.removeprefix('memory://')}/hf")


@pytest.mark.parametrize("error, kind, reason", [
    (PermissionError("Access Denied"), UserError, "StorageAccessDenied"),
    (FileNotFoundError("NoSuchBucket"), UserError, "StorageNotFound"),
    (ConnectionResetError("reset by peer"), TransientError, "StorageUnavailable"),
])
def test_storage_errors_are_classified_for_the_operator(error, kind, reason):
    with pytest.raises(kind) as raised:
        with storage_errors("s3://b/p"):
            raise error
    assert raised.value.reason == reason and "s3://b/p" in raised.value.message
    assert isinstance(raised.value, StepError)


def test_an_unknown_protocol_is_a_clear_user_error(tmp_path):
    with pytest.raises(UserError, match="nosuch://b/p"):
        Mirror("nosuch://b/p", tmp_path)
