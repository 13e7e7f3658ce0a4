"""register: the converted folder -> MLflow's model registry on a real `mlflow server`, once per run."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .helpers import make_config

UID_A = "0b7c8a52-5c1e-4a7e-9d2e-00000000000a"
UID_B = "0b7c8a52-5c1e-4a7e-9d2e-00000000000b"
# The proxied tests below each have a run of their own: the MLflow client caches a run's
# artifact repository, with the server address it was made for.
UID_C, UID_D, UID_E = (f"0b7c8a52-5c1e-4a7e-9d2e-00000000000{c}" for c in "cde")


@pytest.fixture
def new_work_dir(tmp_path, converted_hf):
    """Storage roots of runs whose convert step is done: hf/ holds the converted folder."""
    def make(name: str) -> Path:
        work = tmp_path / name
        shutil.copytree(converted_hf, work / "hf")
        return work
    return make


@pytest.fixture
def mlflow_upstream(mlflow_server):
    """(host, port) of the real server, for a proxy in front of it. run_register makes the proxy
    the process-wide MLflow URI; the next tests get the real server back."""
    import mlflow

    host, port = mlflow_server.removeprefix("http://").split(":")
    yield host, int(port)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)


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

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
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


def test_unreachable_tracking_server_is_transient_and_fails_naming_mlflow(new_work_dir, tiny_model_dir,
                                                                          monkeypatch):
    """Down for longer than the retries: one error, retryable, that names MLflow and the server."""
    import mlflow  # noqa: F401  (imported before the clock starts: slow on a busy machine)

    from kubetune_trainer.errors import TransientError
    from kubetune_trainer.register import run_register
    from tests.support.mlflow_server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("KUBETUNE_REGISTER_RETRY_SECONDS", "3")
    config = make_config(new_work_dir("d"), tiny_model_dir,
                         mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(TransientError) as raised:
        run_register(config)
    took = time.monotonic() - started
    assert 3 <= took < 20, took  # it waited out its retry budget, and no more
    assert raised.value.reason == "MLflowUnavailable" and not raised.value.permanent
    assert raised.value.message.startswith("MLflow at http://127.0.0.1:")
    assert re.search(r"Connection refused.*\(still failing after [23] attempts in 3s\)$", raised.value.message)


def test_backoff_doubles_up_to_its_cap_and_stops_at_the_budget():
    from kubetune_trainer.errors import TransientError
    from kubetune_trainer.register import with_retries

    now, waits = [0.0], []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    def down() -> dict:
        now[0] += 0.5  # each try takes a little time
        raise TransientError("MLflow at http://x: Connection refused", "MLflowUnavailable")
    with pytest.raises(TransientError, match="still failing after 8 attempts in 100s"):
        with_retries(down, 100, sleep=sleep, clock=lambda: now[0])
    assert waits[:5] == [2, 4, 8, 16, 30] and waits[5] == 30 and sum(waits) < 100

    answers = iter([TransientError("down", "MLflowUnavailable"), {"ok": 1}])

    def flaky() -> dict:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer
    assert with_retries(flaky, 100, sleep=sleep, clock=lambda: now[0]) == {"ok": 1}


def test_mlflow_down_while_registering_is_waited_for_and_registers_once_it_is_back(
        new_work_dir, tiny_model_dir, mlflow_server, mlflow_upstream, monkeypatch, caplog):
    """The server goes away (connections refused, as when its process died) before the step
    registers; the step retries with backoff and succeeds once the server is reachable again."""
    from mlflow import MlflowClient

    from kubetune_trainer.register import run_register
    from tests.support.faulty_proxy import FaultyProxy

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("KUBETUNE_REGISTER_RETRY_SECONDS", "60")
    host, port = mlflow_upstream
    with FaultyProxy(host, port) as proxy:
        proxy.down()
        config = make_config(new_work_dir("f"), tiny_model_dir, register_to="main.finetunes.outage",
                             run_uid=UID_C, mlflow_tracking_uri=proxy.url)
        timer = threading.Timer(5, proxy.up)  # an outage of 5 s: a couple of retries
        timer.start()
        try:
            with caplog.at_level("WARNING", logger="kubetune_trainer.register"):
                result = run_register(config)
        finally:
            timer.cancel()
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries and all(m.startswith(f"MLflow at {proxy.url}") for m in retries), retries
    assert result["registeredModel"]["version"] == "1"
    registry = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    versions = registry.search_model_versions("name = 'main.finetunes.outage'")
    assert len(versions) == 1


def test_errors_and_lost_replies_from_mlflow_never_make_a_second_version(
        new_work_dir, tiny_model_dir, mlflow_server, mlflow_upstream, monkeypatch):
    """The create request's reply is lost after MLflow made the version (its client retries the
    POST, making another), and later requests meet 500s: still exactly one version."""
    from mlflow import MlflowClient

    from kubetune_trainer.register import run_register
    from tests.support.faulty_proxy import Faults, FaultyProxy

    monkeypatch.setenv("KUBETUNE_REGISTER_RETRY_SECONDS", "60")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    host, port = mlflow_upstream
    faults = Faults(seed=11, error=0.2, paths=("/model-versions/", "/registered-models/"),
                    script=("forward", "lost_reply", "lost_reply"))
    with FaultyProxy(host, port, faults=faults) as proxy:
        config = make_config(new_work_dir("g"), tiny_model_dir, register_to="main.finetunes.lossy",
                             run_uid=UID_D, mlflow_tracking_uri=proxy.url)
        result = run_register(config)
        assert run_register(config) == result
    assert proxy.counts["lost_reply"] >= 1, proxy.counts
    registry = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    versions = registry.search_model_versions("name = 'main.finetunes.lossy'")
    assert [v.version for v in versions] == [result["registeredModel"]["version"]], versions


def test_a_register_step_killed_mid_registration_and_retried_registers_one_version(
        new_work_dir, tiny_model_dir, mlflow_server, mlflow_upstream, tmp_path):
    """SIGKILL the step (as a node loss would) once while it creates the version and once just
    after MLflow made it, before the step recorded it; the retried step leaves one version."""
    from mlflow import MlflowClient

    from kubetune_trainer.register import run_register
    from tests.support.faulty_proxy import FaultyProxy

    work = new_work_dir("h")
    config = make_config(work, tiny_model_dir, register_to="main.finetunes.killed", run_uid=UID_E,
                         mlflow_tracking_uri=mlflow_server)
    config_file = tmp_path / "config.json"
    host, port = mlflow_upstream
    steps: list[subprocess.Popen] = []

    def kill_at(marker: str, nth: int):
        """Kill the step when it sends its `nth` request to a path holding `marker`."""
        seen = []

        def hook(request) -> str | None:
            seen.append(marker in request.target)
            if sum(seen) == nth and seen[-1]:
                steps[-1].kill()
                return "drop"  # a dead process sends nothing more
            return None
        return hook

    outcomes = []
    for hook in (kill_at("/model-versions/create", 1),   # before MLflow made the version
                 kill_at("/model-versions/search", 2)):  # after it did: the look-up that follows
        with FaultyProxy(host, port, on_request=hook) as proxy:
            config_file.write_text(config.model_copy(update={"mlflow_tracking_uri": proxy.url})
                                   .model_dump_json())
            steps.append(subprocess.Popen(
                [sys.executable, "-m", "kubetune_trainer", "register", "--config", str(config_file)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            output = steps[-1].communicate(timeout=180)[0]
            outcomes.append((steps[-1].returncode, output[-2000:]))
    assert [code for code, _ in outcomes] == [-signal.SIGKILL, -signal.SIGKILL], outcomes
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    [made] = client.search_model_versions("name = 'main.finetunes.killed'")  # by the second step
    assert not (work / "result" / "register.json").exists()  # neither step got to record it

    result = run_register(config)  # the retried step
    [version] = client.search_model_versions("name = 'main.finetunes.killed'")
    assert version.version == made.version == result["registeredModel"]["version"]
    assert version.tags["kubetune.run_uid"] == config.run_uid
    assert json.loads((work / "result" / "register.json").read_text()) == result


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
