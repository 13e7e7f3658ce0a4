"""register: the converted folder -> MLflow's model registry on a real `mlflow server`, once per run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from .helpers import make_config

UID_A = "0b7c8a52-5c1e-4a7e-9d2e-00000000000a"
UID_B = "0b7c8a52-5c1e-4a7e-9d2e-00000000000b"


@pytest.fixture
def new_work_dir(tmp_path, converted_hf):
    """Storage roots of runs whose convert step is done: hf/ holds the converted folder."""
    def make(name: str) -> Path:
        work = tmp_path / name
        shutil.copytree(converted_hf, work / "hf")
        return work
    return make


def training_run(client, experiment_path: str, run_uid: str) -> tuple[str, str]:
    """An MLflow run as the train step leaves it: tagged with the uid, params logged, finished."""
    experiment_id = client.create_experiment(experiment_path)
    run = client.create_run(experiment_id, run_name="tiny-run", tags={"kubetune.run_uid": run_uid})
    client.log_param(run.info.run_id, "learning_rate", "5e-07")
    client.set_terminated(run.info.run_id)
    return experiment_id, run.info.run_id


def test_registers_once_per_run_linked_to_the_training_run(new_work_dir, tiny_model_dir, mlflow_server):
    from mlflow import MlflowClient

    from kubetune_trainer.register import run_register

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    experiment_id, run_id = training_run(client, "/Users/team-a/trained", UID_A)
    work = new_work_dir("a")
    (work / "result").mkdir()
    (work / "result" / "train.json").write_text(json.dumps(
        {"latestCheckpoint": "ep0-ba2-rank0.pt", "mlflow": {"experimentId": experiment_id, "runId": run_id}}))
    config = make_config(work, tiny_model_dir, run_uid=UID_A, register_to="main.finetunes.once",
                         mlflow_tracking_uri=mlflow_server)

    first = run_register(config)
    again = run_register(config)  # a retried finalize

    assert again == first
    assert first["mlflow"] == {"experimentId": experiment_id, "runId": run_id}
    assert first["registeredModel"]["name"] == "main.finetunes.once"
    assert first["registeredModel"]["version"] == "1"
    assert json.loads((work / "result" / "register.json").read_text()) == first
    [version] = client.search_model_versions("name = 'main.finetunes.once'")
    assert version.run_id == run_id
    assert version.tags == {"kubetune.run_uid": UID_A, "kubetune.run_name": "tiny-run",
                            "kubetune.training_run_id": run_id}
    assert "team-a/tiny-run" in version.description and run_id in version.description
    assert first["registeredModel"]["artifactUri"] == f"{version.source}/model"
    assert client.get_run(run_id).data.params == {"learning_rate": "5e-07"}, "training params kept"

    # Another run registering to the same name gets its own, next version.
    other = make_config(new_work_dir("b"), tiny_model_dir, run_uid=UID_B,
                        register_to="main.finetunes.once", mlflow_tracking_uri=mlflow_server)
    assert run_register(other)["registeredModel"]["version"] == "2"
    assert len(client.search_model_versions("name = 'main.finetunes.once'")) == 2


def test_registered_version_is_a_loadable_model(new_work_dir, tiny_model_dir, converted_hf,
                                                mlflow_server, tmp_path):
    """Without a training run on record, a run of its own is made (once); the version's files are
    the Hugging Face folder for `transformers` and an MLflow transformers model for `mlflow`."""
    import mlflow
    import yaml
    from mlflow import MlflowClient
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.register import run_register

    config = make_config(new_work_dir("c"), tiny_model_dir, register_to="main.finetunes.loadable",
                         experiment_path="/Users/team-a/standalone", mlflow_tracking_uri=mlflow_server)
    result = run_register(config)
    assert run_register(config) == result

    client = MlflowClient(mlflow_server)
    run = client.get_run(result["mlflow"]["runId"])
    assert run.data.tags["kubetune.run_uid"] == config.run_uid
    assert run.data.params["learning_rate"] == "5e-07" and run.data.params["model"] == str(tiny_model_dir)
    assert len(client.search_runs([result["mlflow"]["experimentId"]])) == 1

    folder = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=result["registeredModel"]["artifactUri"], dst_path=str(tmp_path / "hf"),
        tracking_uri=mlflow_server))
    for key, tensor in load_file(folder / "model.safetensors").items():
        assert tensor.equal(load_file(converted_hf / "model.safetensors")[key])
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True, return_tensors="pt")
    assert model.generate(prompt, max_new_tokens=3, min_new_tokens=3).shape[1] == prompt.shape[1] + 3

    mlmodel = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        "models:/main.finetunes.loadable/1/MLmodel", tracking_uri=mlflow_server)).read_text())
    assert {"transformers", "python_function"} <= set(mlmodel["flavors"])
    assert mlmodel["metadata"]["task"] == "llm/v1/chat"
    chat = mlflow.pyfunc.load_model("models:/main.finetunes.loadable/1")
    answer = chat.predict({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert answer[0]["object"] == "chat.completion"
    assert answer[0]["choices"][0]["message"]["role"] == "assistant"


def test_unreachable_tracking_server_is_transient_and_fails_fast(new_work_dir, tiny_model_dir, monkeypatch):
    from kubetune_trainer.errors import TransientError
    from kubetune_trainer.register import run_register
    from tests.support.mlflow_server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    config = make_config(new_work_dir("d"), tiny_model_dir,
                         mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(TransientError) as raised:
        run_register(config)
    assert time.monotonic() - started < 15
    assert raised.value.reason == "TrackingServerUnavailable" and not raised.value.permanent
    assert "127.0.0.1" in raised.value.message


@pytest.mark.parametrize("name", ["main.finetunes", "main.fine tunes.x", "a.b.c.d", "main.schema.'x'"])
def test_invalid_model_name_is_a_user_error(new_work_dir, tiny_model_dir, name):
    from kubetune_trainer.errors import UserError
    from kubetune_trainer.register import run_register

    config = make_config(new_work_dir("e"), tiny_model_dir, register_to=name)
    with pytest.raises(UserError) as raised:
        run_register(config)
    assert raised.value.reason == "InvalidModelName" and name in raised.value.message


def test_registering_before_conversion_is_a_user_error(tmp_path, tiny_model_dir):
    from kubetune_trainer.errors import UserError
    from kubetune_trainer.register import run_register

    with pytest.raises(UserError) as raised:
        run_register(make_config(tmp_path, tiny_model_dir))
    assert raised.value.reason == "ModelFolderMissing"
