"""The service's tutorials (examples/sdk/, only the import line changed) against the real operator,
and the SDK, the CLI and kubectl watching one run: every version any of them saw, they saw alike.

One run goes to COMPLETED (~60 s) and serves every check on a finished run; a second continues
from its last checkpoint with custom_weights_path (started as soon as the first has trained, so
its data preparation overlaps the first's conversion), is seen training, and is cancelled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kubetune.foundation_model import client
from kubetune.foundation_model.types import run_from_resource, status_from_phase

from .conftest import wait_phase
from .test_sdk_errors import kubeconfig_for

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "sdk"
RUN_TIMEOUT = 300


def script_env(kubeconfig: Path, **values: str) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1", **values}


def run_script(name: str, env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


class Started:
    """A process writing to files (a long watch would fill a pipe and stall)."""

    def __init__(self, argv: list[str], env: dict[str, str], folder: Path, label: str, started: list):
        self.out, self.err = folder / f"{label}.out", folder / f"{label}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True, cwd=REPO)
        started.append(self)

    def wait(self, timeout: float) -> tuple[int, str]:
        code = self.process.wait(timeout=timeout)
        return code, self.out.read_text() + self.err.read_text()

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        return self.out.read_text()


@pytest.fixture
def started():
    """Every process a test started, stopped when it ends, however it ends."""
    processes: list[Started] = []
    yield processes
    for process in processes:
        process.stop()


def kubetune_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kubetune.cli", *args]


def documents(text: str) -> list[dict]:
    """The objects of a `-w -o json` stream: JSON documents one after the other."""
    decoder, found, index = json.JSONDecoder(), [], 0
    while (index := _skip_blanks(text, index)) < len(text):
        document, index = decoder.raw_decode(text, index)
        found.append(document)
    return found


def _skip_blanks(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index


def row_of(name: str, table: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.split()[:1] == [name])


def versions(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["resourceVersion"]: o for o in objects}


class SdkWatcher(threading.Thread):
    """The SDK's own watch on the run, recording every version it is told of until the run ends."""

    def __init__(self, namespace: str, name: str):
        super().__init__(daemon=True)
        self.namespace, self.name, self.seen = namespace, name, {}

    def run(self) -> None:
        with client.connect(self.namespace) as runs:  # KUBECONFIG: the test's, monkeypatched
            changes = runs.watch(name=self.name)
            for _, resource in changes:
                self.seen[resource["metadata"]["resourceVersion"]] = run_from_resource(resource)
                if self.seen[resource["metadata"]["resourceVersion"]].status.is_terminal():
                    changes.close()
                    return


def test_the_services_tutorials_run_unchanged_and_sdk_cli_and_kubectl_agree(
        operator, cluster, kubectl, namespace, inputs, tmp_path, monkeypatch, wait_for, started):
    kubeconfig = kubeconfig_for(cluster, kubectl, tmp_path, namespace, None)  # its context names the namespace
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    env = script_env(kubeconfig, MODEL=inputs.model, TRAIN_DATA_PATH=inputs.data("ift.jsonl"),
                     REGISTER_TO="main.e2e.sdk", TRAINING_DURATION="1ep", LEARNING_RATE="1e-3",
                     CONTEXT_LENGTH="128")

    # 1. Create a run; follow it with the tutorial, with `kubetune events -f`, and watch it three ways.
    name = run_script("create_run.py", env).split()[-1]
    sdk_watch = SdkWatcher(namespace, name)
    sdk_watch.start()
    kubectl_watch = Started([str(cluster.kubectl_bin), f"--kubeconfig={kubeconfig}", "get", "trainingrun", name,
                             "-w", "-o", "json"], env, tmp_path, "kubectl-watch", started)
    cli_watch = Started(kubetune_argv("get", name, "-w", "-o", "json"), env, tmp_path, "cli-watch", started)
    tutorial = Started([sys.executable, str(EXAMPLES / "follow_events.py")], {**env, "RUN_NAME": name},
                       tmp_path, "tutorial-follow", started)
    cli_follow = Started(kubetune_argv("events", name, "-f"), env, tmp_path, "cli-follow", started)

    # 2. Continue from the last checkpoint once the run has trained: a longer run, from that path.
    wait_for(lambda: "TRAIN_FINISHED" in [e["type"] for e in (kubectl.json(
        "get", "trainingrun", name, "-n", namespace).get("status") or {}).get("events") or []],
        RUN_TIMEOUT, f"{name} to finish training")
    latest = kubectl.json("get", "trainingrun", name, "-n", namespace)["status"]["latestCheckpoint"]
    continued = run_script("continue_from_checkpoint.py", {**env, "RUN_NAME": name, "TRAINING_DURATION": "20ep",
                                                           "TRAIN_DATA_PATH": inputs.data("ift-long.jsonl")})
    second = continued.split()[-1]
    assert f"{latest}\n{second}" in continued  # the run took the checkpoint path as it was
    spec = kubectl.json("get", "trainingrun", second, "-n", namespace)["spec"]
    assert spec["customWeightsPath"] == latest
    cli_second = Started(kubetune_argv("events", second, "-f"), env, tmp_path, "cli-follow-second", started)

    code, followed = tutorial.wait(RUN_TIMEOUT)
    assert code == 0, followed
    for event in ("CREATED", "TRAIN_STARTED", "TRAIN_FINISHED", "REGISTERED", "COMPLETED"):
        assert f" {event} " in followed, followed
    assert f"{name} ended COMPLETED" in followed
    assert " COMPLETED " in next(line for line in followed.splitlines() if line.startswith("last event:"))
    code, cli_out = cli_follow.wait(60)
    assert code == 0, cli_out
    assert "tok/s" in cli_out and "loss" in cli_out and "ETA" in cli_out, cli_out  # the progress bar
    assert f"{name}: COMPLETED" in cli_out.splitlines()[-1], cli_out

    # 3. The same run, seen by the SDK, the CLI and kubectl: each version alike in all three.
    sdk_watch.join(timeout=60)
    by_kubectl, by_cli = versions(documents(kubectl_watch.stop())), versions(documents(cli_watch.stop()))
    # From the moment all three watched until the run ended, each saw every version, and alike.
    first = max(min(map(int, seen)) for seen in (by_kubectl, by_cli, sdk_watch.seen))
    final = max(map(int, sdk_watch.seen))
    assert sdk_watch.seen[str(final)].status.value == "COMPLETED"
    window = {v for v in {*by_kubectl, *by_cli, *sdk_watch.seen} if first <= int(v) <= final}
    assert window <= set(by_kubectl) & set(by_cli) & set(sdk_watch.seen), (first, final, sorted(window))
    assert any((by_kubectl[v].get("status") or {}).get("phase") == "Training" for v in window)
    for version in window:
        phase = (by_kubectl[version].get("status") or {}).get("phase")
        assert by_cli[version] == by_kubectl[version]
        assert sdk_watch.seen[version].phase == (phase or "Pending")
        assert sdk_watch.seen[version].status is status_from_phase(phase)
    table = row_of(name, kubectl("get", "trainingruns", "-n", namespace).stdout)
    wide = row_of(name, subprocess.run(kubetune_argv("get", "-o", "wide"), env=env, capture_output=True,
                                       text=True, timeout=60).stdout)
    assert table[2] == "Succeeded" and wide[1] == "COMPLETED" and wide[5] == "Succeeded"

    # 4. List runs by status: the first has completed, the second is in progress.
    listed = run_script("list_runs.py", env)
    assert f"{name} COMPLETED {inputs.model}" in listed and "1 run(s) in progress" in listed
    assert subprocess.run(kubetune_argv("list", "--statuses", "COMPLETED", "-o", "name"), env=env,
                          capture_output=True, text=True, timeout=60).stdout.split() == [f"trainingrun.kubetune.dev/{name}"]

    # 5. The continued run trains (from the checkpoint); cancel it with the tutorial: the CLI
    # following it sees STOPPED and exits non-zero.
    wait_for(lambda: (kubectl.json("get", "trainingrun", second, "-n", namespace).get("status") or {})
             .get("progress", {}).get("percent", 0) > 0, RUN_TIMEOUT, f"{second} to train from the checkpoint")

    cancelled = run_script("cancel_run.py", {**env, "RUN_NAME": second})
    assert f"Cancelled {second} successfully." in cancelled
    assert cancelled.split()[-1] in ("TERMINATING", "STOPPED")
    code, out = cli_second.wait(120)
    assert code == 1 and f"{second}: STOPPED" in out, out
    run = wait_phase(kubectl, namespace, second, {"Cancelled"}, 60, operator)
    assert "STOPPED" in [e["type"] for e in run["status"]["events"]]

    # 6. Delete it with the CLI: gone for kubectl too.
    deleted = subprocess.run(kubetune_argv("delete", second), env=env, capture_output=True, text=True, timeout=60)
    assert deleted.returncode == 0 and f'"{second}" deleted' in deleted.stdout
    wait_for(lambda: kubectl("get", "trainingrun", second, "-n", namespace, check=False).returncode != 0, 60,
             f"{second} to be gone")
