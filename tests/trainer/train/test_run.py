"""One real training run with eval data and prompts, inspected from every side: result files,
checkpoints, progress (file and Prometheus), and the MLflow run."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from composer.core import Callback

from kubetune_trainer.train import run_train

from .conftest import config_factory, free_port, random_rows, write_prepared


def scrape(port: int) -> dict[str, str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.split(" ")[0].split("{")[0]: line for line in text.splitlines()
            if line.startswith("kubetune_train_")}


class Scraper(Callback):
    """Scrapes rank 0's endpoint mid-run (batch 2) and once training has ended."""

    def __init__(self, port: int):
        self.port, self.during, self.after = port, {}, {}

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == 2:
            self.during = scrape(self.port)

    def fit_end(self, state, logger):
        self.after = scrape(self.port)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, mlflow_uri):
    work = tmp_path_factory.mktemp("run") / "work"
    make = config_factory(work, tiny_model_dir, mlflow_uri)
    write_prepared(work / "data", "eval", random_rows(4, seed=2))
    config = make(training_duration="6ba", save_interval="4ba", eval_data_path="unused",
                  eval_prompts=["hello world", "the model learns"], metrics_port=free_port())
    scraper = Scraper(config.metrics_port)
    result = run_train(config, callbacks=[scraper])
    return config, result, scraper


def gauge(metrics: dict[str, str], name: str) -> float:
    return float(metrics[f"kubetune_train_{name}"].rsplit(" ", 1)[1])


def test_result_names_the_final_checkpoint_and_the_mlflow_run(run):
    config, result, _ = run
    checkpoints = Path(config.checkpoint_dir)
    assert result["latestCheckpoint"] == str(checkpoints / "ep1-ba6-rank0.pt")
    assert result["mlflow"]["runId"] and result["mlflow"]["experimentId"]
    assert json.loads(Path(config.result_dir, "train.json").read_text()) == result


def test_checkpoints_at_the_interval_and_at_the_end_with_a_latest_pointer(run):
    config, _, _ = run
    checkpoints = Path(config.checkpoint_dir)
    assert sorted(p.name for p in checkpoints.glob("ep*")) == ["ep0-ba4-rank0.pt", "ep1-ba6-rank0.pt"]
    latest = checkpoints / "latest-rank0.pt"
    assert latest.is_symlink() and os.readlink(latest) == "ep1-ba6-rank0.pt"


def test_progress_file_holds_the_final_state(run):
    config, result, _ = run
    progress = json.loads(Path(config.progress_file).read_text())
    assert progress["percent"] == 100.0 and progress["etaSeconds"] == 0.0
    assert (progress["batchesDone"], progress["batchesTotal"]) == (6, 6)
    assert progress["loss"] > 0 and progress["tokensPerSecond"] > 0 and progress["time"] > 0
    assert progress["latestCheckpoint"] == result["latestCheckpoint"]
    assert progress["mlflow"] == result["mlflow"]


def test_metrics_are_served_during_and_after_training(run):
    config, result, scraper = run
    assert gauge(scraper.during, "batches_done") == 2 and gauge(scraper.during, "batches_total") == 6
    assert 0 < gauge(scraper.during, "progress_ratio") < 1 and gauge(scraper.during, "eta_seconds") > 0
    assert gauge(scraper.after, "progress_ratio") == 1.0 and gauge(scraper.after, "loss") > 0
    assert gauge(scraper.after, "tokens_per_second") > 0
    info = scraper.after["kubetune_train_info"]
    assert f'mlflow_run_id="{result["mlflow"]["runId"]}"' in info
    assert f'latest_checkpoint="{result["latestCheckpoint"]}"' in info
    with pytest.raises(OSError):  # the endpoint is shut down with the trainer: no leaked server
        scrape(config.metrics_port)


@pytest.fixture(scope="module")
def mlflow_run(run, mlflow_uri):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    return client, client.get_run(run[1]["mlflow"]["runId"])


def test_mlflow_run_is_tagged_and_records_the_checkpoints(run, mlflow_run, tmp_path):
    config, result, _ = run
    client, record = mlflow_run
    tags = record.data.tags
    assert record.info.status == "FINISHED"
    assert tags["kubetune.run_uid"] == config.run_uid
    assert tags["kubetune.checkpoint_folder"] == config.storage_uri(config.checkpoint_dir)
    assert tags["kubetune.latest_checkpoint"] == config.storage_uri(result["latestCheckpoint"])
    index = json.loads(Path(client.download_artifacts(record.info.run_id, "kubetune/checkpoints.json",
                                                      str(tmp_path))).read_text())
    assert index["latest"] == config.storage_uri(result["latestCheckpoint"])
    assert [Path(c["uri"]).name for c in index["checkpoints"]] == ["ep0-ba4-rank0.pt", "ep1-ba6-rank0.pt"]
    assert all(c["bytes"] > 0 for c in index["checkpoints"])


def test_mlflow_has_hyperparameters_train_metrics_and_eval_loss_per_checkpoint(mlflow_run):
    client, record = mlflow_run
    params = record.data.params
    assert params["optimizer"] == "DecoupledLionW" and float(params["learning_rate"]) == 1e-3
    assert params["context_length"] == "32" and params["training_duration"] == "6ba"
    losses = client.get_metric_history(record.info.run_id, "loss/train/total")
    assert len(losses) == 6
    evals = client.get_metric_history(record.info.run_id, "metrics/eval/LanguageCrossEntropy")
    assert sorted(m.step for m in evals) == [4, 6]


def test_eval_prompt_generations_are_logged_per_checkpoint(mlflow_run):
    client, record = mlflow_run
    table = client.load_table(record.info.experiment_id, "generations.json", run_ids=[record.info.run_id])
    assert sorted(zip(table["batch"], table["prompt"])) == [
        (4, "hello world"), (4, "the model learns"), (6, "hello world"), (6, "the model learns")]
    assert all(isinstance(text, str) and text for text in table["generation"])
