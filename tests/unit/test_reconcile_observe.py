"""From Kubernetes objects to `Observed`: pods, Jobs, termination messages, metrics."""

from __future__ import annotations

import json

import pytest

from kubetune.manifests import Component
from kubetune.reconcile import (
    JobState,
    Observed,
    PodState,
    job_failure,
    job_state,
    observe,
    parse_metrics,
    parse_termination_message,
    pod_state,
    progress_url,
)
from kubetune.settings import OperatorSettings


def k8s_pod(name: str, job: str, phase: str, index: int = 0, message: str | None = None,
            exit_code: int | None = None, ip: str | None = None, deleting: bool = False) -> dict:
    state = {"terminated": {"exitCode": exit_code, "message": message, "reason": "Error"}} \
        if exit_code is not None else {"running": {}}
    meta = {"name": name, "labels": {"batch.kubernetes.io/job-name": job},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase, "podIP": ip,
                                         "containerStatuses": [{"name": "train", "state": state}]}}


def k8s_job(name: str, component: str, attempt: int | None = None, conditions: list | None = None,
            suspend: bool = False, completions: int = 1, **status: int) -> dict:
    labels = {"kubetune.dev/run": "demo", "kubetune.dev/component": component}
    if attempt is not None:
        labels["kubetune.dev/attempt"] = str(attempt)
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"suspend": suspend, "completions": completions},
            "status": {"conditions": conditions or [], **status}}


def test_termination_message_json_or_not() -> None:
    assert parse_termination_message('{"ok": true, "step": "train"}') == {"ok": True, "step": "train"}
    assert parse_termination_message("Traceback: boom") is None
    assert parse_termination_message("[1, 2]") is None
    assert parse_termination_message(None) is None


def test_pod_state_reads_result_and_falls_back_to_the_log_tail() -> None:
    result = {"step": "train", "ok": False, "reason": "DataValidationFailed", "permanent": True}
    state = pod_state(k8s_pod("p0", "demo-train-1", "Failed", index=1,
                              message=json.dumps(result), exit_code=2))
    assert (state.index, state.exit_code, state.result, state.permanent) == (1, 2, result, True)
    crashed = pod_state(k8s_pod("p1", "demo-prep", "Failed", message="CUDA error\n", exit_code=1))
    assert crashed.result is None and crashed.message == "CUDA error" and not crashed.permanent
    running = pod_state(k8s_pod("p2", "demo-prep", "Running", ip="10.0.0.5", deleting=True))
    assert running.exit_code is None and running.ip == "10.0.0.5" and running.terminating


def test_job_state_conditions() -> None:
    complete = job_state(k8s_job("demo-prep", "prep", conditions=[
        {"type": "Complete", "status": "True"}], succeeded=1))
    assert complete.done and complete.settled and complete.component is Component.PREP
    failing = job_state(k8s_job("demo-train-2", "train", attempt=2, conditions=[
        {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]))
    assert failing.attempt == 2 and failing.failed_reason == "BackoffLimitExceeded"
    assert failing.settled and not failing.done
    ignored = job_state(k8s_job("demo-finalize", "finalize", conditions=[
        {"type": "Failed", "status": "False"}], active=1))
    assert ignored.failed_reason is None and not ignored.settled
    queued = job_state(k8s_job("demo-train-1", "train", attempt=1, suspend=True, completions=2))
    assert queued.suspended and queued.completions == 2 and not queued.done


CONFIG = {"run_name": "demo", "run_uid": "u", "model": "m", "train_data_path": "/d",
          "work_dir": "/w", "experiment_path": "/e", "register_to": "a.b.c"}
RUN_SNAPSHOT = {"version": 1, "spec": {"model": "m", "trainDataPath": "/d", "registerTo": "a.b"}}


def test_observe_groups_children() -> None:
    config = {"metadata": {"name": "demo-config"}, "data": {"config.json": json.dumps(CONFIG),
                                                          "run.json": json.dumps(RUN_SNAPSHOT)}}
    observed = observe(
        jobs=[k8s_job("demo-prep", "prep", succeeded=1), k8s_job("demo-train-2", "train", 2),
              k8s_job("demo-train-1", "train", 1)],
        pods=[k8s_pod("demo-train-2-0-x", "demo-train-2", "Running", ip="10.1.1.1"),
              k8s_pod("demo-prep-x", "demo-prep", "Succeeded", exit_code=0, message="{}")],
        config_maps=[config], services=[{"metadata": {"name": "demo-train"}}],
        progress={"percent": 1.0})
    assert observed.config_map and observed.config.run_name == "demo" and observed.service
    assert observed.prep.done and len(observed.prep.pods) == 1
    assert [j.attempt for j in observed.train] == [1, 2]
    assert observed.train_job(2).pods[0].ip == "10.1.1.1"
    assert observed.finalize is None and observed.progress == {"percent": 1.0}


@pytest.mark.parametrize("data, says", [
    ({"config.json": '{"from": "the future"}', "run.json": json.dumps(RUN_SNAPSHOT)}, "cannot be read"),
    ({"config.json": json.dumps(CONFIG)}, "has no run.json"),
    ({"config.json": json.dumps(CONFIG), "run.json": json.dumps({**RUN_SNAPSHOT, "version": 9})},
     "has version 9"),
    ({"config.json": json.dumps(CONFIG), "run.json": "not json"}, "cannot be read"),
])
def test_an_unreadable_snapshot_is_named_never_rebuilt(data, says) -> None:
    observed = observe(config_maps=[{"metadata": {"name": "demo-config"}, "data": data}])
    assert observed.config_map and observed.snapshot is None and observed.config is None
    assert "ConfigMap demo-config" in observed.snapshot_problem and says in observed.snapshot_problem


def test_progress_url_is_rank_zero_of_the_newest_live_attempt() -> None:
    settings = OperatorSettings()
    old = JobState("demo-train-1", Component.TRAIN, 1, terminating=True,
                   pods=(PodState("a", "Running", 0, ip="10.0.0.1"),))
    new = JobState("demo-train-2", Component.TRAIN, 2, active=2, pods=(
        PodState("b", "Running", 1, ip="10.0.0.3"), PodState("c", "Running", 0, ip="10.0.0.2")))
    assert progress_url(Observed(train=(old, new)), settings) == "http://10.0.0.2:9400/metrics"
    assert progress_url(Observed(train=(old,)), settings) is None
    pending = JobState("demo-train-3", Component.TRAIN, 3, pods=(PodState("d", "Pending", 0),))
    assert progress_url(Observed(train=(pending,)), settings) is None


METRICS = """\
# HELP kubetune_train_progress_ratio Fraction of the training duration done
# TYPE kubetune_train_progress_ratio gauge
kubetune_train_progress_ratio 0.25
kubetune_train_batches_done 25.0
kubetune_train_batches_total 100.0
kubetune_train_tokens_per_second 1234.5
kubetune_train_loss 2.5
kubetune_train_eta_seconds 300.0
kubetune_train_info{latest_checkpoint="ckpt/ep0-ba20-rank0.pt",mlflow_experiment_id="3",mlflow_run_id="abc",\
resume_note="checkpoint ep0-ba30-rank0.pt unreadable (\\"bad\\" zip)\\nresumed",resumed_from="ckpt/ep0-ba20-rank0.pt"} 1.0
"""


def test_parse_metrics() -> None:
    assert parse_metrics(METRICS) == {
        "percent": 25.0, "batchesDone": 25, "batchesTotal": 100, "tokensPerSecond": 1234.5,
        "loss": 2.5, "etaSeconds": 300.0, "latestCheckpoint": "ckpt/ep0-ba20-rank0.pt",
        "resumedFrom": "ckpt/ep0-ba20-rank0.pt",
        "resumeNote": 'checkpoint ep0-ba30-rank0.pt unreadable ("bad" zip)\nresumed',  # unescaped
        "mlflow": {"experimentId": "3", "runId": "abc"}}
    assert parse_metrics("# nothing yet\nprocess_cpu_seconds_total 3.0\n") is None


def test_job_failure_classification() -> None:
    ranks = (PodState("a", "Failed", 0, exit_code=1, result={"reason": "NcclTimeout",
                                                             "message": "rank 0 timed out"}),
             PodState("b", "Failed", 1, exit_code=2, result={"reason": "InvalidInput",
                                                             "message": "bad", "permanent": True}))
    failure = job_failure(JobState("j", Component.TRAIN, 1, pods=ranks), "TrainingFailed")
    assert (failure.reason, failure.permanent) == ("InvalidInput", True)  # the user error wins
    deadline = JobState("j", Component.TRAIN, 1, failed_reason="DeadlineExceeded", pods=ranks[:1])
    assert job_failure(deadline, "TrainingFailed").reason == "DeadlineExceeded"
    bare = JobState("j", Component.PREP, failed_reason="BackoffLimitExceeded")
    assert job_failure(bare, "DataPreparationFailed").reason == "DataPreparationFailed"


def test_a_job_is_done_once_every_index_has_a_pod_that_succeeded() -> None:
    ranks = (PodState("t-0", "Succeeded", 0, exit_code=0), PodState("t-1", "Running", 1))
    job = JobState("demo-train-1", Component.TRAIN, 1, completions=2, active=1, pods=ranks)
    assert not job.done  # rank 1 still trains
    both = JobState("demo-train-1", Component.TRAIN, 1, completions=2, active=0,
                    pods=(ranks[0], PodState("t-1", "Succeeded", 1, exit_code=0)))
    assert both.done and both.settled  # before the Job controller counts them
    retried = JobState("demo-prep", Component.PREP, completions=1,
                       pods=(PodState("p-a", "Failed", 0, exit_code=1), PodState("p-b", "Succeeded", 0, exit_code=0)))
    assert retried.done
