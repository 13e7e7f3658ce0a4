"""Training on an object-store work_dir (a real S3 endpoint): checkpoints are uploaded as they are
saved, and a new pod with nothing local resumes from the latest one, or from the one before it
when the latest is corrupt."""

from __future__ import annotations

import json
import uuid

import pytest

from kubetune_trainer.errors import UserError
from kubetune_trainer.contract import ENV_SCRATCH_DIR
from kubetune_trainer.storage import Mirror, staged
from kubetune_trainer.train import run_train

from .conftest import config_factory
from .test_resume import Crash, Watch


def train_in_pod(config, pod_dir, monkeypatch, callbacks=()):
    """What the CLI does in a fresh pod: stage, train, push."""
    monkeypatch.setenv(ENV_SCRATCH_DIR, str(pod_dir))
    with staged("train", config) as local:
        return run_train(local, callbacks=list(callbacks))


def test_a_new_pod_resumes_from_the_checkpoint_on_the_object_store(s3_env, tmp_path, tiny_model_dir,
                                                                   mlflow_uri, monkeypatch):
    from mlflow import MlflowClient

    prefix = f"runs/{uuid.uuid4().hex[:8]}"
    remote = s3_env.uri(prefix)
    make = config_factory(tmp_path / "prepared", tiny_model_dir, mlflow_uri)  # prepared data, locally
    Mirror(remote, tmp_path / "prepared").push("data")  # ... uploaded as `prepare` would
    config = make(work_dir=remote, training_duration="6ba", save_interval="2ba")

    with pytest.raises(RuntimeError, match="simulated"):
        train_in_pod(config, tmp_path / "pod1", monkeypatch, [Crash()])  # dies after batch 3
    keys = s3_env.keys(prefix)
    assert {"checkpoints/ep0-ba2-rank0.pt", "checkpoints/latest-rank0.pt.symlink"} <= set(keys), keys
    assert "result/train.json" not in keys  # a failed step pushes no result

    resumed = Watch()
    result = train_in_pod(config, tmp_path / "pod2", monkeypatch, [resumed])  # nothing local here
    assert (resumed.start_batch, resumed.end_batch) == (2, 6)
    latest = result["latestCheckpoint"]
    assert latest.startswith(f"{remote}/checkpoints/") and latest.endswith("-ba6-rank0.pt"), latest
    name = latest.rsplit("/", 1)[1]
    fs = s3_env.filesystem()
    assert fs.cat_file(f"{s3_env.bucket}/{prefix}/checkpoints/latest-rank0.pt.symlink") == name.encode()
    keys = s3_env.keys(prefix)
    assert f"checkpoints/{name}" in keys and "result/train.json" in keys
    recorded = json.loads(fs.cat_file(f"{s3_env.bucket}/{prefix}/result/train.json"))
    assert recorded["latestCheckpoint"] == latest  # no staging path reaches a record
    progress = json.loads(fs.cat_file(f"{s3_env.bucket}/{prefix}/result/progress.json"))
    assert progress["latestCheckpoint"] == latest
    assert len([k for k in keys if k.startswith("checkpoints/ep")]) == 3  # batches 2, 4 and 6
    run = MlflowClient(mlflow_uri).get_run(result["mlflow"]["runId"])
    assert run.data.tags["kubetune.checkpoint_folder"] == f"{remote}/checkpoints"
    assert run.data.tags["kubetune.latest_checkpoint"] == latest

    # The latest checkpoint cut short on the store (a killed save): the next new pod falls back to
    # the one before it, as on a mounted volume, not to the initial weights.
    cut = f"{s3_env.bucket}/{prefix}/checkpoints/{name}"
    fs.pipe_file(cut, fs.cat_file(cut)[: fs.size(cut) // 2])
    fell_back = Watch()
    result = train_in_pod(config, tmp_path / "pod3", monkeypatch, [fell_back])
    assert (fell_back.start_batch, fell_back.end_batch) == (4, 6)
    assert result["resumedFrom"] == f"{remote}/checkpoints/ep0-ba4-rank0.pt"
    assert result["resumeNote"].startswith(f"checkpoint {name} unreadable"), result["resumeNote"]
    assert not list((tmp_path / "pod3").rglob("ep0-ba2-rank0.pt"))  # pulled only as far back as needed


class StartWeights(Watch):
    def fit_start(self, state, logger):
        super().fit_start(state, logger)
        self.initial = {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def test_a_later_run_starts_from_custom_weights_named_by_an_object_store_pointer(
        s3_env, tmp_path, tiny_model_dir, mlflow_uri, monkeypatch):
    import torch

    prefix = f"runs/{uuid.uuid4().hex[:8]}"
    remote = s3_env.uri(prefix)
    make = config_factory(tmp_path / "first", tiny_model_dir, mlflow_uri)
    Mirror(remote, tmp_path / "first").push("data")
    first = Watch()
    train_in_pod(make(work_dir=remote, training_duration="2ba"), tmp_path / "pod1", monkeypatch, [first])

    # The next run keeps its files on a mounted volume and starts from the first run's weights.
    later = config_factory(tmp_path / "later", tiny_model_dir, mlflow_uri)(
        training_duration="1ba", custom_weights_path=f"{remote}/checkpoints/latest-rank0.pt.symlink")
    start = StartWeights()
    train_in_pod(later, tmp_path / "pod2", monkeypatch, [start])
    assert start.start_batch == 0  # its own run, from batch 0 ...
    for name, tensor in first.weights.items():  # ... with the weights the first one ended with
        torch.testing.assert_close(start.initial[name], tensor, msg=name)

    missing = later.model_copy(update={"custom_weights_path": f"{remote}/checkpoints/nope.pt"})
    with pytest.raises(UserError, match="customWeightsPath .*nope.pt") as raised:
        train_in_pod(missing, tmp_path / "pod3", monkeypatch)
    assert raised.value.reason == "CustomWeightsMissing"
