"""Autoresume: a restarted run continues from its latest checkpoint, in the same MLflow run,
and ends with the weights an uninterrupted run reaches; past a checkpoint cut short, from the
one before it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from composer.core import Callback

from kubetune_trainer import checkpoints
from kubetune_trainer.train import run_train

from .conftest import config_factory


class Crash(Callback):
    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == 3:
            raise RuntimeError("simulated node failure")


class Watch(Callback):
    def fit_start(self, state, logger):
        self.start_batch = int(state.timestamp.batch)

    def fit_end(self, state, logger):
        self.end_batch = int(state.timestamp.batch)
        self.weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def test_restart_continues_from_the_latest_checkpoint(make_config, tmp_path, tiny_model_dir, mlflow_uri):
    from mlflow import MlflowClient

    config = make_config(training_duration="6ba", save_interval="2ba")
    with pytest.raises(RuntimeError, match="simulated"):
        run_train(config, callbacks=[Crash()])  # dies after batch 3; the checkpoint of batch 2 is there
    assert os.readlink(Path(config.checkpoint_dir, "latest-rank0.pt")) == "ep0-ba2-rank0.pt"
    client = MlflowClient(mlflow_uri)
    [failed] = client.search_runs(client.get_experiment_by_name(config.experiment_path).experiment_id,
                                  f"tags.`kubetune.run_uid` = '{config.run_uid}'")
    assert failed.info.status == "FAILED"

    resumed = Watch()
    result = run_train(config, callbacks=[resumed])
    assert (resumed.start_batch, resumed.end_batch) == (2, 6)
    assert result["mlflow"]["runId"] == failed.info.run_id
    assert client.get_run(failed.info.run_id).info.status == "FINISHED"
    checkpoints = sorted(Path(config.checkpoint_dir).iterdir())
    progress = Path(config.progress_file).read_text()
    again = run_train(config)  # one more retry after the end only reports again
    assert again == {**result, "resumedFrom": result["latestCheckpoint"]}  # from the last one now
    assert sorted(Path(config.checkpoint_dir).iterdir()) == checkpoints
    assert Path(config.progress_file).read_text() == progress

    straight = Watch()
    fresh = config_factory(tmp_path / "straight", tiny_model_dir, mlflow_uri)
    run_train(fresh(training_duration="6ba", save_interval="2ba"), callbacks=[straight])
    assert straight.start_batch == 0
    for name, tensor in straight.weights.items():
        torch.testing.assert_close(resumed.weights[name], tensor, msg=name)


def test_an_unreadable_latest_checkpoint_is_passed_over_for_the_one_before(make_config):
    config = make_config(training_duration="4ba", save_interval="2ba")
    run_train(config)
    folder = Path(config.checkpoint_dir)
    latest = folder / "ep0-ba4-rank0.pt"
    assert os.readlink(folder / "latest-rank0.pt") == latest.name
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a save cut short

    resumed = Watch()
    result = run_train(config, callbacks=[resumed])
    assert resumed.start_batch == 2 and resumed.end_batch == 4
    note = result["resumeNote"]
    assert note.startswith("checkpoint ep0-ba4-rank0.pt unreadable") and note.endswith("resumed from ep0-ba2-rank0.pt")
    progress = json.loads(Path(config.progress_file).read_text())
    assert progress["resumeNote"] == note and progress["latestCheckpoint"] == str(latest)
    older = (folder / "ep0-ba2-rank0.pt").resolve()
    assert Path(result["resumedFrom"]).resolve() == Path(progress["resumedFrom"]).resolve() == older
    assert checkpoints.defect(latest) is None  # saved again, whole this time
