"""Faults in every phase, through the real API server: the operator SIGKILLed at each phase
transition and while its run is deleted, MLflow down while the run registers, a trainer that
crashes in every attempt, storage that fills up during data preparation.

Each test drives one run through all the faults it can take, so the suite pays for few runs.
Where a fault needs this machine (its pods' processes or nodes, a tmpfs mount, an MLflow proxy
the pods reach) the test says so and is left out on a remote cluster.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kubetune.deletion import KEEP_STORAGE_ANNOTATION
from kubetune.k8s.cluster import camel
from tests.support.faulty_proxy import FaultyProxy

from .conftest import log_size, wait_leading, wait_phase
from .test_controls import (
    LONG_DATA,
    ONE_SHOT_EVENTS,
    RUN_TIMEOUT,
    STOP_TIMEOUT,
    TERMINAL,
    checkpoint_batch,
    children,
    condition,
    create,
    event_types,
    first_trained_batch,
    live_status,
    names,
    rank0_log,
    status_of,
    tiny_spec,
    train_pods,
    wait_checkpoint,
    wait_succeeded,
)

pytestmark = pytest.mark.cluster


class ChildLedger:
    """Every Job and pod of a run seen so far, by name → uid: a name seen with a second uid was
    created twice."""

    def __init__(self, kubectl, namespace: str, run: str):
        self.kubectl, self.namespace, self.run = kubectl, namespace, run
        self.uids: dict[str, str] = {}

    def look(self) -> list[dict]:
        found = children(self.kubectl, self.namespace, self.run, "jobs,pods,services,configmaps")
        for obj in found:
            key = f"{obj['kind']}/{obj['metadata']['name']}"
            uid = self.uids.setdefault(key, obj["metadata"]["uid"])
            assert uid == obj["metadata"]["uid"], f"{key} was created twice"
        return found


def finalize_log(kubectl, namespace: str, name: str) -> str:
    return kubectl("logs", f"-l=kubetune.dev/run={name},kubetune.dev/component=finalize",
                   "-n", namespace, "--tail=-1", check=False).stdout


def kill_operator(operator) -> int:
    """SIGKILL, as an OOM kill or a node loss would; the log offset to wait for its successor."""
    operator.kill()
    return log_size(operator)


def restart(operator, since: int, wait_for) -> None:
    operator.start()
    wait_leading(operator, since, wait_for, timeout=180)  # the dead one's Lease runs out; slow starts


def kill_in(phase: str, operator, kubectl, namespace: str, name: str, ledger: ChildLedger,
            wait_for) -> int:
    """Wait until the run reports `phase`, then SIGKILL the operator; its log offset."""
    def reached():
        ledger.look()
        return live_status(kubectl, namespace, name).get("phase") == phase
    wait_for(reached, RUN_TIMEOUT, f"{name} to reach {phase}", interval=0.3)
    return kill_operator(operator)


class OutageAt:
    """Takes `proxy` down the moment the run reports `phase`, whatever the test is doing then:
    restarting the operator waits out the dead one's Lease, longer than a fast step may take to
    reach what the proxy stands for once the run is in `phase`."""

    def __init__(self, proxy: FaultyProxy, phase: str, kubectl, namespace: str, name: str):
        self.proxy, self.phase, self.stopping = proxy, phase, threading.Event()
        self.down = threading.Event()
        self.thread = threading.Thread(target=self._watch, args=(kubectl, namespace, name), daemon=True)
        self.thread.start()

    def _watch(self, kubectl, namespace: str, name: str) -> None:
        while not self.stopping.is_set():
            try:
                phase = status_of(kubectl, namespace, name).get("phase")
            except Exception:  # noqa: BLE001 - the API server may be slow to answer: ask again
                phase = None
            if phase == self.phase:
                self.proxy.down()
                self.down.set()
                return
            if phase in TERMINAL:
                return
            self.stopping.wait(0.3)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


@pytest.mark.slow  # ~2.5 min on an idle machine: five restarts, each waiting out the dead one's Lease
def test_an_operator_killed_in_every_phase_and_while_its_run_is_deleted_leaves_one_of_everything(
        operator, cluster, kubectl, namespace, inputs, site, wait_for):
    """One run: the operator is SIGKILLed before the run is created (it sits Pending while the
    operator is down), then as the run enters PreparingData, Training and Registering (MLflow
    goes down at the same time, locally), and restarted each time; then killed again, the run
    deleted while it is down, and restarted. The run finishes in its first attempt, no child is
    created twice, no event is recorded twice, one model version is registered, and the
    deletion leaves nothing of the run."""
    from mlflow import MlflowClient

    name, model = "phoenix", f"main.e2e.phoenix_{namespace[-6:]}"
    mlflow = urlsplit(site.tracking_uri)
    # The proxy listens where the pods reach this machine (on real nodes: the cluster network's end).
    listen = cluster.kubelets.network.host_ip if cluster.kubelets else "127.0.0.1"
    proxy = FaultyProxy(mlflow.hostname, mlflow.port, host=listen).start() if cluster.control_plane else None
    outage = None
    try:
        spec = tiny_spec(inputs, registerTo=model)
        if proxy:
            spec["mlflow"] = {"trackingUri": proxy.url}
        ledger = ChildLedger(kubectl, namespace, name)
        kills = [("Pending", kill_operator(operator))]
        create(kubectl, namespace, name, spec)
        assert not ledger.look() and not status_of(kubectl, namespace, name)
        # MLflow goes down as the run starts registering (the training's MLflow calls are over).
        outage = OutageAt(proxy, "Registering", kubectl, namespace, name) if proxy else None
        restart(operator, kills[-1][1], wait_for)
        for phase in ("PreparingData", "Training", "Registering"):
            kills.append((phase, kill_in(phase, operator, kubectl, namespace, name, ledger, wait_for)))
            if phase == "Registering" and outage:  # up again once the finalize step has met the outage
                assert outage.down.wait(RUN_TIMEOUT), "MLflow was never taken down"
                wait_for(lambda: "retrying in" in finalize_log(kubectl, namespace, name), RUN_TIMEOUT,
                         "the finalize step to retry MLflow", interval=1)
                proxy.up()
            restart(operator, kills[-1][1], wait_for)
        run = wait_succeeded(kubectl, namespace, name, operator)
        ledger.look()
    finally:
        if outage:
            outage.stop()
        if proxy:
            proxy.stop()
        if not operator.alive():  # a failure above must not leave the next tests without one
            operator.start()

    status = run["status"]
    assert status["attempts"] == 1, status
    assert names(children(kubectl, namespace, name, "jobs")) == {
        f"{name}-prep", f"{name}-train-1", f"{name}-finalize"}
    pods = Counter(key.split("/")[1].rsplit("-", 1)[0] for key in ledger.uids if key.startswith("Pod/"))
    assert all(count == 1 for count in pods.values()), f"a step ran in more than one pod: {pods}"
    counts = Counter(event_types(run))
    assert {t: counts[t] for t in ONE_SHOT_EVENTS} == dict.fromkeys(ONE_SHOT_EVENTS, 1), counts
    entries = [(e["type"], e["message"]) for e in status["events"]]
    assert len(entries) == len(set(entries)), entries
    mirrors = Counter(e["reason"] for e in kubectl.json(
        "get", "events", "-n", namespace, f"--field-selector=involvedObject.name={name}")["items"])
    assert all(mirrors[camel(t)] <= 1 for t in ONE_SHOT_EVENTS), mirrors  # lost, perhaps; never twice
    versions = MlflowClient(site.tracking_uri).search_model_versions(f"name = '{model}'")
    assert [v.version for v in versions] == [status["registeredModel"]["version"]] == ["1"]
    if proxy:  # the finalize step waited for MLflow in its one pod, instead of failing it
        assert len(children(kubectl, namespace, name, "pods", component="finalize")) == 1
        log = finalize_log(kubectl, namespace, name)
        assert f"MLflow at {proxy.url}" in log and "registered" in log, log[-3000:]

    # Deleted while the operator is down: when it is back, nothing of the run is left.
    since = kill_operator(operator)
    kubectl("delete", "trainingrun", name, "-n", namespace, "--wait=false")
    restart(operator, since, wait_for)
    wait_for(lambda: kubectl("get", "trainingrun", name, "-n", namespace, check=False).returncode != 0,
             STOP_TIMEOUT, f"{name} to be gone")
    wait_for(lambda: not children(kubectl, namespace, name), STOP_TIMEOUT, f"every child of {name} gone")
    if site.storage_folder:  # nothing of it is left in its storage either
        assert not (Path(site.storage_folder) / namespace / name).exists()


def test_a_trainer_that_crashes_in_every_attempt_fails_the_run_with_its_exit_code_and_log_tail(
        operator, faults, kubectl, namespace, inputs, site, wait_for):
    """backoffLimit 1: the trainer is SIGKILLed in both attempts. The run fails as
    BackoffLimitExceeded with the last exit code and the end of its log, and each failed attempt
    is an event."""
    name = "crasher"
    create(kubectl, namespace, name, tiny_spec(inputs, LONG_DATA, trainingDuration="20ep", backoffLimit=1))
    for attempt in (1, 2):
        pod = wait_for(lambda: live_status(kubectl, namespace, name) and train_pods(
            kubectl, namespace, name, attempt).get(0), RUN_TIMEOUT, f"the trainer of attempt {attempt}")
        # Once it has logged a batch, so the log tail has something of the trainer's own.
        wait_for(lambda: "Train time/batch" in kubectl("logs", f"-l=kubetune.dev/attempt={attempt},"
                                                       f"kubetune.dev/run={name}", "-n", namespace,
                                                       "-c", "train", check=False).stdout,
                 RUN_TIMEOUT, f"the first batch of attempt {attempt}", interval=0.5)
        assert faults.kill_trainer(namespace, pod["metadata"]["name"]), f"attempt {attempt} is not training"
    run = wait_phase(kubectl, namespace, name, TERMINAL, 120, operator)

    status = run["status"]
    failed = condition(run, "Failed")
    assert status["phase"] == "Failed" and failed["reason"] == "BackoffLimitExceeded", failed
    assert status["attempts"] == 2
    assert "2 attempts failed (backoffLimit 1)" in failed["message"]
    assert "exited with code 137" in failed["message"], failed["message"]  # SIGKILL: 128 + 9
    assert "Train time/batch" in failed["message"], failed["message"]  # the log tail
    events = [e for e in status["events"] if e["type"] in ("RETRYING", "FAILED")]
    assert [e["type"] for e in events] == ["RETRYING", "FAILED"], status["events"]
    # The RETRYING event keeps the exit code and the end of the log tail; only the tail's start is cut.
    assert events[0]["message"].startswith("attempt 1 failed") and "Train time/batch" in events[0]["message"]
    assert "exited with code 137" in events[0]["message"], events[0]["message"]
    assert "code 137" in events[1]["message"]
    wait_for(lambda: not [p for p in children(kubectl, namespace, name, "pods", component="train")
                          if p["status"].get("phase") not in ("Succeeded", "Failed")],
             STOP_TIMEOUT, "no training pod left running")

    # Annotated to keep its storage, the deleted run leaves its files for a look.
    kubectl("annotate", "trainingrun", name, "-n", namespace, f"{KEEP_STORAGE_ANNOTATION}=true")
    kubectl("delete", "trainingrun", name, "-n", namespace, "--wait=false")
    wait_for(lambda: not children(kubectl, namespace, name), STOP_TIMEOUT, f"every child of {name} gone")
    if site.storage_folder:
        assert (Path(site.storage_folder) / namespace / name / "data" / "_SUCCESS").is_file()


def test_a_kubelet_and_containerd_restarted_and_a_deleted_pod_mid_training_leave_one_of_everything(
        operator, faults, kubectl, namespace, inputs, site, wait_for):
    """Real nodes, one run: the kubelet and then containerd of the training pod's node restart
    mid-training (the container trains on: same pod, same attempt, no container restart); then
    the training pod is deleted, which fails attempt 1, and attempt 2 resumes from the latest
    checkpoint. The run Succeeds with one model version, one Job per step, each one-shot event
    once, and no child created twice. (A killed trainer: test_controls and the crasher above.)"""
    from mlflow import MlflowClient

    if not faults.real_nodes:
        pytest.skip("restarts a kubelet and containerd: needs this machine's real nodes (the default; not KUBETUNE_E2E_NODE=agent)")
    name, model = "weather", f"main.e2e.node_faults_{namespace[-6:]}"
    create(kubectl, namespace, name, tiny_spec(inputs, LONG_DATA, trainingDuration="3ep", backoffLimit=1,
                                               registerTo=model))
    ledger = ChildLedger(kubectl, namespace, name)
    checkpoint = wait_checkpoint(kubectl, namespace, name, wait_for)
    pod = train_pods(kubectl, namespace, name, 1)[0]

    faults.restart_kubelet(pod)
    faults.restart_containerd(pod)
    checkpoint = wait_checkpoint(kubectl, namespace, name, wait_for, after=checkpoint)   # it trained on
    ledger.look()
    after = train_pods(kubectl, namespace, name, 1)[0]
    assert after["metadata"]["uid"] == pod["metadata"]["uid"] and after["status"]["phase"] == "Running"
    state = after["status"]["containerStatuses"][0]
    assert state["restartCount"] == 0 and "running" in state["state"], state
    assert live_status(kubectl, namespace, name)["attempts"] == 1

    kubectl("delete", "pod", pod["metadata"]["name"], "-n", namespace, "--wait=false")
    wait_for(lambda: ledger.look() and live_status(kubectl, namespace, name).get("attempts") == 2,
             RUN_TIMEOUT, "attempt 2 after the pod's deletion")
    resumed_from = wait_for(lambda: live_status(kubectl, namespace, name) and first_trained_batch(
        rank0_log(kubectl, namespace, name, 2)), RUN_TIMEOUT, "attempt 2's first batch")
    assert resumed_from >= checkpoint > 0
    run = wait_succeeded(kubectl, namespace, name, operator)
    ledger.look()

    status = run["status"]
    assert status["attempts"] == 2 and event_types(run).count("RETRYING") == 1, status["events"]
    assert names(children(kubectl, namespace, name, "jobs")) == {
        f"{name}-prep", f"{name}-train-2", f"{name}-finalize"}
    resumes = [e["message"] for e in status["events"] if e["type"] == "RESUMED_FROM_CHECKPOINT"]
    assert len(resumes) == 1 and checkpoint_batch(resumes[0]) == resumed_from, status["events"]
    counts = Counter(event_types(run))
    assert {t: counts[t] for t in ONE_SHOT_EVENTS} == dict.fromkeys(ONE_SHOT_EVENTS, 1), counts
    versions = MlflowClient(site.tracking_uri).search_model_versions(f"name = '{model}'")
    assert [v.version for v in versions] == [status["registeredModel"]["version"]] == ["1"]


@pytest.fixture
def small_work_dir(cluster, site, namespace):
    """A 1 MiB tmpfs mounted where the run named `full` keeps its files (this machine, as root)."""
    if cluster.kubelets:   # make test runs it in the node agent's lane (tests/support/lanes.py)
        pytest.skip("a tmpfs mounted inside a local PersistentVolume's folder is not what the pod "
                    "sees: the kubelet binds the folder without its submounts")
    if not cluster.local or not site.storage_folder:
        pytest.skip("mounts a small filesystem on this machine's storage folder")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    work = Path(site.storage_folder) / namespace / "full"
    work.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs", str(work)], check=True)
    try:
        yield work
    finally:
        subprocess.run(["umount", "-l", str(work)], check=False)


def test_storage_full_during_data_preparation_fails_the_run_clearly_and_keeps_what_was_saved(
        operator, kubectl, namespace, inputs, small_work_dir):
    name = "full"
    saved = small_work_dir / "result" / "notes.txt"  # what an earlier step left there
    saved.parent.mkdir(mode=0o777)
    saved.write_text("kept\n")
    create(kubectl, namespace, name, tiny_spec(inputs, LONG_DATA))
    run = wait_phase(kubectl, namespace, name, TERMINAL, RUN_TIMEOUT, operator)

    failed = condition(run, "Failed")
    assert run["status"]["phase"] == "Failed", run["status"]
    assert failed["reason"] == "StorageFull", failed
    message = failed["message"]
    assert "no space left" in message.lower() and "storage" in message and "Traceback" not in message, message
    assert saved.read_text() == "kept\n"
    assert not (small_work_dir / "data" / "_SUCCESS").exists()
    assert not children(kubectl, namespace, name, "jobs", component="train")
