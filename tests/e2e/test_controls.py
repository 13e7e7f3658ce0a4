"""The run controls, through the real API server: retries that resume, suspend, cancel, delete,
deadlines, TTL, bad data and an API server restarted mid-run (an operator killed in each phase
is in test_faults.py).

A crashed trainer is its container's main process SIGKILLed (`faults.py`: on the node agent its
process group, on real nodes the container's main process). Locally "the processes stopped" is
also checked on the processes themselves; elsewhere the pods' phases stand for that. Against a
remote cluster the tests that inject faults are left out.
Runs are tiny (a tiny model, epochs of a few batches, or of a few seconds where a test must act
between two checkpoints); every wait polls against a deadline.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from .conftest import apply, restart_operator, trainingrun, wait_phase
from .site import Inputs

pytestmark = pytest.mark.cluster
LONG_DATA = "ift-long.jsonl"  # ~150 batches, a few seconds, per epoch: time to act between checkpoints
BROKEN_DATA = "ift_broken.jsonl"
RUN_TIMEOUT = 420
TERMINAL = {"Succeeded", "Failed", "Cancelled"}
STOP_TIMEOUT = 90  # a deleted Job's pods are stopped and gone
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
ONE_SHOT_EVENTS = ("CREATED", "VALIDATED", "DATA_VALIDATED", "TRAIN_STARTED", "TRAIN_FINISHED",
                   "REGISTERED", "COMPLETED")


# --- helpers ---------------------------------------------------------------------------------

def tiny_spec(inputs: Inputs, data: str = "ift.jsonl", **extra) -> dict:
    return {"model": inputs.model, "trainDataPath": inputs.data(data), "registerTo": "main.e2e.controls",
            "trainingDuration": "1ep", "learningRate": 1e-3, "contextLength": 128,
            "globalBatchSize": 8, **extra}


def create(kubectl, namespace: str, name: str, spec: dict) -> None:
    apply(kubectl, [{**trainingrun(name, spec), "metadata": {"name": name, "namespace": namespace}}])


def status_of(kubectl, namespace: str, name: str) -> dict:
    return kubectl.json("get", "trainingrun", name, "-n", namespace).get("status") or {}


def condition(run: dict, type_: str) -> dict:
    return next(c for c in run["status"]["conditions"] if c["type"] == type_)


def event_types(run: dict) -> list[str]:
    return [event["type"] for event in run["status"].get("events") or []]


def children(kubectl, namespace: str, run: str, kinds: str = "jobs,pods,services,configmaps",
             **labels: str) -> list[dict]:
    selector = ",".join([f"kubetune.dev/run={run}",
                         *(f"kubetune.dev/{key}={value}" for key, value in labels.items())])
    return kubectl.json("get", kinds, "-n", namespace, "-l", selector)["items"]


def names(objects: list[dict]) -> set[str]:
    return {o["metadata"]["name"] for o in objects}


def train_pods(kubectl, namespace: str, run: str, attempt: int | None = None) -> dict[int, dict]:
    """Training pods by node rank (their completion index)."""
    labels = {"component": "train", **({"attempt": str(attempt)} if attempt else {})}
    return {int(p["metadata"]["annotations"][COMPLETION_INDEX]): p
            for p in children(kubectl, namespace, run, "pods", **labels)}


def running_process(agent, namespace: str, pod: dict, container: str) -> subprocess.Popen | None:
    """The live process of a pod's container on the node agent (None when not running)."""
    run = agent.find(namespace, pod["metadata"]["name"])
    process = run.procs.get(container) if run else None
    return process if process is not None and process.poll() is None else None


def train_process(agent, kubectl, namespace: str, run: str,
                  attempt: int | None = None) -> subprocess.Popen | None:
    """The live training process of a one-node run."""
    pod = train_pods(kubectl, namespace, run, attempt).get(0)
    return running_process(agent, namespace, pod, "train") if pod else None


def wait_training(cluster, kubectl, namespace: str, run: str, wait_for) -> subprocess.Popen | None:
    """Wait until rank 0 of a one-node run is training; its process where this machine runs it."""
    def running():
        pod = train_pods(kubectl, namespace, run).get(0)
        if not pod or pod["status"].get("phase") != "Running":
            return None
        return train_process(cluster.agent, kubectl, namespace, run) if cluster.local else pod
    found = wait_for(running, RUN_TIMEOUT, f"the training of {run} to run")
    return found if cluster.local else None


def wait_stopped(process: subprocess.Popen | None, wait_for) -> None:
    """Where this machine runs the pods, their processes must stop too."""
    if process is not None:
        wait_for(lambda: process.poll() is not None, 30, "the trainer process to stop")


def checkpoint_batch(path: str) -> int:
    """The batch a checkpoint was written at: `.../ep{e}-ba{b}-rank{r}.pt`."""
    return int(re.search(r"-ba(\d+)-rank\d+\.pt$", path)[1])


def first_trained_batch(log: str) -> int | None:
    """Batches already done when a trainer process ran its first batch: Composer's console
    logger prints the first batch's `time/batch`, 0 on a fresh start, the checkpoint's batch
    after a resume."""
    match = re.search(r"Train time/batch: (\d+)", log)
    return int(match[1]) if match else None


def rank0_log(kubectl, namespace: str, run: str, attempt: int) -> str:
    pod = train_pods(kubectl, namespace, run, attempt).get(0)
    return kubectl("logs", pod["metadata"]["name"], "-n", namespace, "-c", "train",
                   check=False).stdout if pod else ""


def live_status(kubectl, namespace: str, name: str) -> dict:
    """The run's status, asserting it has not ended (a wait on it then fails at once)."""
    status = status_of(kubectl, namespace, name)
    assert status.get("phase") not in TERMINAL, f"{name} ended early: {status.get('conditions')}"
    return status


def wait_checkpoint(kubectl, namespace: str, name: str, wait_for, after: int = 0) -> int:
    """Wait until status.latestCheckpoint names a checkpoint past batch `after`; its batch."""
    def newer():
        latest = live_status(kubectl, namespace, name).get("latestCheckpoint")
        return latest and checkpoint_batch(latest) > after and checkpoint_batch(latest)
    return wait_for(newer, RUN_TIMEOUT, f"a checkpoint of {name} past batch {after}", interval=0.5)


def wait_succeeded(kubectl, namespace: str, name: str, operator) -> dict:
    """Wait for the run to end; it must have Succeeded (a failure fails at once, with why)."""
    run = wait_phase(kubectl, namespace, name, TERMINAL, RUN_TIMEOUT, operator)
    assert run["status"]["phase"] == "Succeeded", run["status"].get("conditions")
    return run


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def set_suspend(kubectl, namespace: str, name: str, suspend: bool) -> None:
    kubectl("patch", "trainingrun", name, "-n", namespace, "--type=merge",
            "-p", f'{{"spec": {{"suspend": {str(suspend).lower()}}}}}')


# --- tests -----------------------------------------------------------------------------------

def test_suspension_and_a_crashed_trainer_both_resume_from_the_latest_checkpoint(
        operator, faults, kubectl, namespace, inputs, wait_for):
    """One run: suspended and lifted (the same attempt), then its trainer crashes (attempt 2)."""
    name = "resume"
    create(kubectl, namespace, name, tiny_spec(inputs, LONG_DATA, trainingDuration="4ep", backoffLimit=2))
    checkpoint = wait_checkpoint(kubectl, namespace, name, wait_for)

    # Suspension stops the training pods; the run keeps its attempt.
    set_suspend(kubectl, namespace, name, True)
    run = wait_phase(kubectl, namespace, name, {"Suspended"}, 60, operator)
    assert condition(run, "Suspended")["status"] == "True"
    assert condition(run, "Running")["status"] == "False"
    wait_for(lambda: not children(kubectl, namespace, name, "pods,jobs", component="train"),
             STOP_TIMEOUT, "the training Job and pods to be gone while suspended")
    suspended_at = checkpoint_batch(status_of(kubectl, namespace, name)["latestCheckpoint"])
    assert suspended_at >= checkpoint

    # Lifting it recreates the same attempt, which resumes from the checkpoint, not batch 0.
    set_suspend(kubectl, namespace, name, False)
    resumed_from = wait_for(lambda: live_status(kubectl, namespace, name) and first_trained_batch(
        rank0_log(kubectl, namespace, name, 1)), RUN_TIMEOUT, "the resumed attempt's first batch")
    assert resumed_from >= suspended_at > 0
    checkpoint = wait_checkpoint(kubectl, namespace, name, wait_for, after=resumed_from)
    status = status_of(kubectl, namespace, name)
    assert status["phase"] == "Training" and status["attempts"] == 1
    assert names(children(kubectl, namespace, name, "jobs", component="train")) == {f"{name}-train-1"}

    # The trainer crashes: the attempt fails and attempt 2 starts from the latest checkpoint.
    pod = train_pods(kubectl, namespace, name, 1)[0]["metadata"]["name"]
    assert faults.kill_trainer(namespace, pod), "the trainer of attempt 1 is not running"
    wait_for(lambda: live_status(kubectl, namespace, name).get("attempts") == 2, 120, "attempt 2")
    assert "RETRYING" in event_types(kubectl.json("get", "trainingrun", name, "-n", namespace))
    wait_for(lambda: not children(kubectl, namespace, name, "pods,jobs", attempt="1"),
             STOP_TIMEOUT, "attempt 1's Job and pods to be deleted")
    run = wait_succeeded(kubectl, namespace, name, operator)
    status = run["status"]
    assert status["attempts"] == 2 and event_types(run).count("RETRYING") == 1
    retrying = next(e for e in status["events"] if e["type"] == "RETRYING")
    assert retrying["message"].startswith("attempt 1 failed")
    assert names(children(kubectl, namespace, name, "jobs", component="train")) == {f"{name}-train-2"}
    assert [p["status"]["phase"] for p in train_pods(kubectl, namespace, name, 2).values()] == ["Succeeded"]
    retried_from = first_trained_batch(rank0_log(kubectl, namespace, name, 2))
    assert retried_from is not None and retried_from >= checkpoint > resumed_from
    # Each resume (the lifted attempt 1, then attempt 2) is one event naming its checkpoint, mirrored once.
    resumes = [e["message"] for e in status["events"] if e["type"] == "RESUMED_FROM_CHECKPOINT"]
    assert [m.split(" resumed from ")[0] for m in resumes] == ["attempt 1", "attempt 2"], status["events"]
    assert checkpoint_batch(resumes[1]) == retried_from and "CHECKPOINT_FALLBACK" not in event_types(run)
    assert status["resume"]["attempt"] == 2 and "note" not in status["resume"]
    mirrors = [e for e in kubectl.json("get", "events", "-n", namespace,
                                       f"--field-selector=involvedObject.name={name}")["items"]
               if e["reason"] == "ResumedFromCheckpoint"]
    assert sum(e.get("count") or 1 for e in mirrors) == 2, mirrors


def test_deleting_a_run_mid_training_removes_every_child_its_files_and_stops_its_processes(
        operator, cluster, kubectl, namespace, inputs, site, wait_for):
    name = "doomed"
    create(kubectl, namespace, name, tiny_spec(inputs, LONG_DATA, trainingDuration="20ep"))
    trainer = wait_training(cluster, kubectl, namespace, name, wait_for)
    kinds = Counter(o["kind"] for o in children(kubectl, namespace, name))
    assert kinds["Job"] == 2 and kinds["Service"] == 1 and kinds["ConfigMap"] == 1 and kinds["Pod"] >= 2

    kubectl("delete", "trainingrun", name, "-n", namespace)
    wait_for(lambda: not children(kubectl, namespace, name), STOP_TIMEOUT,
             "the garbage collector to remove the Jobs, pods, Service and ConfigMap")
    wait_stopped(trainer, wait_for)
    if site.storage_folder:  # its files went first (a cleanup Job), the staged inputs stay
        assert not (Path(site.storage_folder) / namespace / name).exists()
        assert (Path(site.storage_folder) / namespace / "e2e-inputs").is_dir()


def test_an_api_server_restart_mid_training_is_ridden_out_without_duplicates(
        operator, cluster, kubectl, namespace, inputs, wait_for):
    """kube-apiserver goes down mid-training: the pods train on, the operator's watches resume (or,
    if its Lease ran out meanwhile, it exits as a replica must and is restarted as its Deployment
    would), and the run finishes in its first attempt with each one-shot event once."""
    if cluster.control_plane is None:
        pytest.skip("restarts the API server of this machine's cluster")
    name = "steady"
    create(kubectl, namespace, name, tiny_spec(inputs, LONG_DATA, trainingDuration="2ep"))
    wait_training(cluster, kubectl, namespace, name, wait_for)

    cluster.control_plane.restart("kube-apiserver")
    restarted = []

    def finished():
        # A process that left for the Lease is restarted here; a pod's container, by its kubelet.
        if not operator.alive() and not restarted:  # left for the Lease, not crashed
            assert operator.process.returncode == 1 and "lost lease" in operator.log_tail(), operator.log_tail()
            restarted.append(restart_operator(operator, wait_for))
        return status_of(kubectl, namespace, name).get("phase") in TERMINAL
    wait_for(finished, RUN_TIMEOUT, f"{name} to finish after the API server restart", interval=1)
    run = wait_succeeded(kubectl, namespace, name, operator)

    assert run["status"]["attempts"] == 1
    counts = Counter(event_types(run))
    assert {t: counts[t] for t in ONE_SHOT_EVENTS} == dict.fromkeys(ONE_SHOT_EVENTS, 1), counts
    assert names(children(kubectl, namespace, name, "jobs")) == {
        f"{name}-prep", f"{name}-train-1", f"{name}-finalize"}


def test_the_cancel_annotation_ends_the_run_cancelled_and_stops_its_pods(
        operator, cluster, kubectl, namespace, inputs, wait_for):
    name = "cancelled"
    create(kubectl, namespace, name, tiny_spec(inputs, LONG_DATA, trainingDuration="20ep"))
    trainer = wait_training(cluster, kubectl, namespace, name, wait_for)

    kubectl("annotate", "trainingrun", name, "-n", namespace, "kubetune.dev/cancel=true")
    run = wait_phase(kubectl, namespace, name, {"Cancelled"}, 60, operator)
    assert "STOPPED" in event_types(run) and "COMPLETED" not in event_types(run)
    assert condition(run, "Succeeded")["status"] == "False"
    assert condition(run, "Succeeded")["reason"] == "Cancelled"
    assert run["status"]["completionTime"]
    wait_for(lambda: not children(kubectl, namespace, name, "pods,jobs", component="train"),
             STOP_TIMEOUT, "the training Job and pods to be gone")
    wait_stopped(trainer, wait_for)
    # A cancelled run stays cancelled: nothing new is started for it.
    assert not children(kubectl, namespace, name, "jobs", component="finalize")
    assert status_of(kubectl, namespace, name)["phase"] == "Cancelled"


def test_invalid_training_data_fails_the_run_naming_file_and_line_before_any_training(
        operator, kubectl, namespace, inputs):
    name = "bad-data"
    create(kubectl, namespace, name, tiny_spec(inputs, BROKEN_DATA))
    run = wait_phase(kubectl, namespace, name, {"Failed", "Succeeded"}, RUN_TIMEOUT, operator)

    failed = condition(run, "Failed")
    assert run["status"]["phase"] == "Failed" and failed["status"] == "True"
    assert failed["reason"] == "DataValidationFailed"
    assert f"{BROKEN_DATA}:2:" in failed["message"]  # file:line: rule
    types = event_types(run)
    assert "FAILED" in types and "DATA_VALIDATED" not in types and "TRAIN_STARTED" not in types
    assert names(children(kubectl, namespace, name, "jobs")) <= {f"{name}-prep"}
    assert not children(kubectl, namespace, name, "jobs,pods", component="train")
    assert not run["status"].get("attempts")


def test_a_run_past_active_deadline_seconds_fails_deadline_exceeded_and_stops(
        operator, kubectl, namespace, inputs, wait_for):
    name, deadline = "late", 20
    create(kubectl, namespace, name, tiny_spec(inputs, LONG_DATA, trainingDuration="20ep",
                                               activeDeadlineSeconds=deadline))
    run = wait_phase(kubectl, namespace, name, {"Failed", "Succeeded"}, 120, operator)

    failed = condition(run, "Failed")
    assert run["status"]["phase"] == "Failed" and failed["reason"] == "DeadlineExceeded"
    assert "FAILED" in event_types(run)
    status = run["status"]
    took = seconds(status["completionTime"]) - seconds(status["startTime"])
    assert deadline - 1 <= took < deadline + 30, took

    def stopped():
        pods = children(kubectl, namespace, name, "pods")
        return all(p["status"].get("phase") in ("Succeeded", "Failed") for p in pods)
    wait_for(stopped, STOP_TIMEOUT, "the run's pods to stop")


def test_ttl_seconds_after_finished_deletes_the_finished_run(operator, kubectl, namespace, wait_for):
    name, ttl = "short-lived", 3
    # The operator (not the CRD) judges this spec: it fails at once, with no pods.
    create(kubectl, namespace, name, tiny_spec(Inputs("/nowhere"), model="google/gemma-2-9b-it",
                                               contextLength=16384, ttlSecondsAfterFinished=ttl))
    failed = wait_for(lambda: status_of(kubectl, namespace, name).get("phase") == "Failed"
                      and status_of(kubectl, namespace, name), 60, "the run to fail")
    finished = seconds(failed["completionTime"])  # the operator's clock is this machine's

    def gone():
        result = kubectl("get", "trainingrun", name, "-n", namespace, check=False)
        return result.returncode != 0 and "NotFound" in result.stderr
    wait_for(gone, ttl + 30, "the finished run to be deleted")
    assert time.time() - finished >= ttl  # kept for its TTL, then deleted
