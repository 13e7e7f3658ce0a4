"""`decide`: one table-like test per transition and failure path of the phase machine."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kubetune.api import EventType, Phase, TrainingRunStatus
from kubetune.manifests import LABEL_ATTEMPT, Component
from kubetune.reconcile import JobState, Observed, Plan, PodState, decide
from kubetune.settings import OperatorSettings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings(trainer_image="trainer:test")
SPEC = {"model": "meta-llama/Llama-3.2-1B", "trainDataPath": "/mnt/kubetune/data/train.jsonl",
        "registerTo": "main.ml"}
STATS = {"samples": 100, "tokens": 5000, "truncatedSamples": 2, "droppedSamples": 1,
         "sequences": 40, "packingEfficiency": 0.9}
MODEL = {"name": "main.ml.demo", "version": "3", "artifactUri": "runs:/abc/hf"}


def body(status: dict | None = None, annotations: dict | None = None, name: str = "demo",
         **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": "team", "uid": "uid-1", "generation": 1,
                         "annotations": annotations or {}},
            "spec": {**SPEC, **spec}, "status": status or {}}


def pod(phase: str = "Running", index: int = 0, exit_code: int | None = None,
        result: dict | None = None, **kw: Any) -> PodState:
    return PodState(name=f"p{index}", phase=phase, index=index, exit_code=exit_code,
                    result=result, **kw)


def job(component: Component, attempt: int = 0, **kw: Any) -> JobState:
    names = {Component.PREP: "demo-prep", Component.FINALIZE: "demo-finalize"}
    name = names.get(component) or f"demo-train-{attempt}"
    return JobState(name=name, component=component, attempt=attempt, **kw)


def done(component: Component, result: dict, attempt: int = 0) -> JobState:
    return job(component, attempt, complete=True, succeeded=1,
               pods=(pod("Succeeded", exit_code=0, result={"ok": True, **result}),))


def failed(component: Component, exit_code: int, reason: str, attempt: int = 0,
           job_reason: str | None = None) -> JobState:
    result = {"ok": False, "reason": reason, "message": f"{reason} happened",
              "permanent": exit_code == 2}
    return job(component, attempt, failed_reason=job_reason,
               pods=(pod("Failed", exit_code=exit_code, result=result),))


def world(**kw: Any) -> Observed:
    """Config map (and service) already there, as after the first reconcile."""
    return Observed(config_map=True, **kw)


def run(b: dict, observed: Observed, now: datetime = NOW) -> tuple[Plan, dict]:
    """Decide, then apply the status patch the way a merge patch does."""
    plan = decide(b, observed, now, SETTINGS)
    TrainingRunStatus.model_validate({**b["status"], **plan.status})  # the API accepts it
    return plan, {**b, "status": {**b["status"], **plan.status}}


def drive(b: dict, *observations: Observed) -> tuple[Plan, dict]:
    plan = Plan()
    for observed in observations:
        plan, b = run(b, observed)
    return plan, b


def condition(b: dict, type_: str) -> dict:
    return next(c for c in b["status"]["conditions"] if c["type"] == type_)


def events(plan: Plan) -> list[EventType]:
    return [e.type for e in plan.events]


def created(plan: Plan) -> list[str]:
    return [m["metadata"]["name"] for m in plan.create]


def deleted(plan: Plan) -> list[str]:
    return [ref.name for ref in plan.delete]


PREPARED = [world(prep=done(Component.PREP, {"dataStats": STATS}))]


def training_body(**spec: Any) -> dict:
    """A run whose data is prepared and whose first attempt was created."""
    _, b = drive(body(**spec), Observed(), *PREPARED)
    return b


# --- start -----------------------------------------------------------------------------------

def test_first_reconcile_snapshots_config_and_starts_data_prep() -> None:
    plan, b = run(body(), Observed())
    assert created(plan) == ["demo-config", "demo-prep"]
    assert b["status"]["phase"] == "PreparingData"
    assert events(plan) == [EventType.CREATED, EventType.VALIDATED]
    assert b["status"]["startTime"] == "2026-03-01T12:00:00Z"
    assert condition(b, "Validated")["status"] == "True"
    assert condition(b, "Running")["status"] == "True"
    assert plan.requeue_after == SETTINGS.progress_interval_seconds


def test_prep_running_changes_nothing() -> None:
    _, b = run(body(), Observed())
    plan, _ = run(b, world(prep=job(Component.PREP, active=1, pods=(pod(),))))
    assert plan.empty


# --- invalid specs ---------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "annotations_name", "field"), [
    ({"registerTo": None}, "demo", "spec.registerTo"),
    ({"resources": {"nodes": 0}}, "demo", "spec.resources.nodes"),
    ({"trainingDuration": "3 epochs"}, "demo", "spec.trainingDuration"),
    ({}, "a" * 60, "metadata.name"),
    ({}, "dotted.name", "metadata.name"),
])
def test_invalid_spec_fails_at_once_naming_the_field(spec: dict, annotations_name: str,
                                                     field: str) -> None:
    b = body(name=annotations_name, **spec)
    b["spec"] = {k: v for k, v in b["spec"].items() if v is not None}
    plan, b = run(b, Observed())
    assert plan.create == ()
    assert b["status"]["phase"] == "Failed"
    failed_condition = condition(b, "Failed")
    assert failed_condition["status"] == "True" and failed_condition["reason"] == "InvalidSpec"
    assert failed_condition["message"].startswith(field)
    assert condition(b, "Validated")["status"] == "False"
    assert condition(b, "Succeeded")["status"] == "False"
    assert events(plan) == [EventType.CREATED, EventType.FAILED]
    assert field in plan.events[-1].message and plan.events[-1].k8s_type == "Warning"
    assert run(b, Observed())[0].empty  # terminal: absorbing


def test_no_storage_anywhere_is_an_invalid_spec() -> None:
    plan = decide(body(), Observed(), NOW, OperatorSettings(storage_claim_name=None))
    assert plan.status["phase"] == "Failed"
    assert condition({"status": plan.status}, "Failed")["message"].startswith("spec.storage")


# --- queueing --------------------------------------------------------------------------------

def test_only_the_training_job_of_a_queued_run_waits_for_admission() -> None:
    b = body(scheduling={"queueName": "gpus"})
    plan, b = run(b, Observed())
    assert b["status"]["phase"] == "PreparingData"  # prepare is CPU work: not queued
    assert plan.create[1]["spec"]["suspend"] is False
    plan, b = run(b, *PREPARED)
    train = next(c for c in plan.create if c["metadata"]["name"] == "demo-train-1")
    assert train["spec"]["suspend"] is True
    assert b["status"]["phase"] == "Queued"
    running = condition(b, "Running")
    assert (running["status"], running["reason"]) == ("False", "Queued")
    assert "LocalQueue gpus" in running["message"]
    plan, b = run(b, world(service=True, prep=PREPARED[0].prep,
                           train=(job(Component.TRAIN, 1, suspended=True),)))
    assert plan.empty
    plan, b = run(b, world(service=True, prep=PREPARED[0].prep,
                           train=(job(Component.TRAIN, 1, active=1),)))  # Kueue admitted it
    assert b["status"]["phase"] == "Training"
    assert condition(b, "Running")["status"] == "True"


def test_preempted_pods_are_not_a_failed_attempt() -> None:
    b = training_body()
    preempted = job(Component.TRAIN, 1, suspended=True,
                    pods=(pod("Failed", exit_code=143, terminating=True),))
    plan, b = run(b, world(service=True, prep=PREPARED[0].prep, train=(preempted,)))
    assert b["status"]["phase"] == "Queued"
    assert plan.delete == () and plan.create == ()
    assert b["status"]["attempts"] == 1


# --- data preparation ------------------------------------------------------------------------

def test_prepared_data_starts_training() -> None:
    _, b = run(body(), Observed())
    plan, b = run(b, *PREPARED)
    assert created(plan) == ["demo-train-1", "demo-train"]  # the Job first: it is what the run waits for
    assert b["status"]["phase"] == "Training"
    assert b["status"]["dataStats"] == STATS
    assert b["status"]["attempts"] == 1
    assert events(plan) == [EventType.DATA_VALIDATED, EventType.TRAIN_STARTED]
    assert "100 samples" in plan.events[0].message
    assert condition(b, "DataPrepared")["status"] == "True"


def test_a_prep_job_done_before_its_pod_is_seen_waits_for_the_pod_s_report() -> None:
    _, b = run(body(), Observed())
    just_done = job(Component.PREP, complete=True, succeeded=1, completed_at=NOW - timedelta(seconds=5))
    plan, b = run(b, world(prep=just_done))  # a watch restarting: the Job shows up before its pod
    assert b["status"]["phase"] == "PreparingData" and not created(plan) and "dataStats" not in b["status"]
    assert plan.requeue_after and plan.requeue_after <= 5
    plan, b = run(b, *PREPARED)  # then the pod, with its report
    assert b["status"]["dataStats"] == STATS and condition(b, "DataPrepared")["status"] == "True"


def test_a_prep_job_whose_pods_are_gone_for_good_goes_on_without_its_report() -> None:
    _, b = run(body(), Observed())
    long_done = job(Component.PREP, complete=True, succeeded=1, completed_at=NOW - timedelta(minutes=5))
    plan, b = run(b, world(prep=long_done))
    assert b["status"]["phase"] == "Training" and "dataStats" not in b["status"]
    assert condition(b, "DataPrepared")["status"] == "True"


def test_prepared_data_is_never_prepared_again() -> None:
    b = training_body()
    # The prep Job is gone (deleted by hand); DataPrepared in status is what counts.
    plan, _ = run(b, world(service=True, train=(job(Component.TRAIN, 1, active=1),)))
    assert plan.empty


@pytest.mark.parametrize(("exit_code", "job_reason", "reason", "message"), [
    (2, "PodFailurePolicy", "DataValidationFailed", "DataValidationFailed happened"),
    (1, "BackoffLimitExceeded", "TransientError", "TransientError happened"),
])
def test_failed_data_prep_fails_the_run(exit_code: int, job_reason: str, reason: str,
                                        message: str) -> None:
    _, b = run(body(), Observed())
    plan, b = run(b, world(prep=failed(Component.PREP, exit_code, reason, job_reason=job_reason)))
    assert b["status"]["phase"] == "Failed"
    assert condition(b, "Failed")["reason"] == reason
    assert condition(b, "Failed")["message"] == message
    assert plan.create == ()
    assert events(plan) == [EventType.FAILED]


def test_prep_pod_crash_without_result_reports_the_log_tail() -> None:
    _, b = run(body(), Observed())
    crashed = job(Component.PREP, failed_reason="BackoffLimitExceeded",
                  pods=(pod("Failed", exit_code=137, message="OOMKilled"),))
    _, b = run(b, world(prep=crashed))
    assert condition(b, "Failed")["reason"] == "DataPreparationFailed"
    assert condition(b, "Failed")["message"] == "pod p0 exited with code 137: OOMKilled"


def test_prep_retrying_inside_its_job_is_still_preparing() -> None:
    _, b = run(body(), Observed())
    retrying = job(Component.PREP, active=1, pods=(pod("Failed", exit_code=1), pod(index=0)))
    plan, _ = run(b, world(prep=retrying))
    assert plan.empty


# --- training --------------------------------------------------------------------------------

def _training(*train: JobState, progress: dict | None = None) -> Observed:
    return world(service=True, prep=PREPARED[0].prep, train=train, progress=progress)


def test_progress_is_reported_and_checkpoint_events_fire_once() -> None:
    b = training_body()
    progress = {"percent": 42.0, "batchesDone": 42, "batchesTotal": 100, "tokensPerSecond": 1e4,
                "loss": 1.5, "etaSeconds": 60.0, "latestCheckpoint": "ckpt/ep0-ba40-rank0.pt",
                "mlflow": {"experimentId": "7", "runId": "r1"}}
    observed = _training(job(Component.TRAIN, 1, active=1), progress=progress)
    plan, b = run(b, observed)
    assert b["status"]["progress"] == {"percent": 42.0, "currentDuration": "42ba",
                                       "totalDuration": "100ba", "tokensPerSecond": 1e4,
                                       "loss": 1.5, "etaSeconds": 60.0}
    assert b["status"]["latestCheckpoint"] == "ckpt/ep0-ba40-rank0.pt"
    assert b["status"]["mlflow"] == {"experimentId": "7", "runId": "r1"}
    assert events(plan) == [EventType.TRAIN_UPDATED, EventType.CHECKPOINT_SAVED]
    assert run(b, observed)[0].empty


def test_each_attempt_s_resume_is_one_event_and_a_fallback_a_warning() -> None:
    b = training_body()
    resumed = {"percent": 40.0, "resumedFrom": "ckpt/ep0-ba40-rank0.pt"}
    observed = _training(job(Component.TRAIN, 1, active=1), progress=resumed)
    plan, b = run(b, observed)
    assert b["status"]["resume"] == {"attempt": 1, "checkpoint": "ckpt/ep0-ba40-rank0.pt"}
    assert events(plan) == [EventType.RESUMED_FROM_CHECKPOINT, EventType.TRAIN_UPDATED]
    assert plan.events[0].message == "attempt 1 resumed from ckpt/ep0-ba40-rank0.pt"
    assert run(b, observed)[0].empty  # seen again: no second event

    # Attempt 2 is created in the tick that reads attempt 1's last report: not taken as attempt 2's.
    plan, b = run(b, _training(failed(Component.TRAIN, 1, "NcclTimeout", attempt=1), progress=resumed))
    assert events(plan) == [EventType.RETRYING] and b["status"]["attempts"] == 2
    # Attempt 2 resumes from the same checkpoint, the newer one being unreadable: its own event.
    note = "checkpoint ep0-ba60-rank0.pt unreadable (truncated): resumed from ep0-ba40-rank0.pt"
    fallback = {**resumed, "percent": 41.0, "resumeNote": note}
    plan, b = run(b, _training(job(Component.TRAIN, 2, active=1), progress=fallback))
    assert events(plan) == [EventType.CHECKPOINT_FALLBACK]
    assert plan.events[0].message == f"attempt 2: {note}" and plan.events[0].k8s_type == "Warning"
    # Its result at the end says the same: nothing new.
    plan, b = run(b, _training(done(Component.TRAIN, {"resumedFrom": resumed["resumedFrom"], "resumeNote": note},
                                    attempt=2)))
    assert EventType.CHECKPOINT_FALLBACK not in events(plan) and b["status"]["resume"]["attempt"] == 2


def test_a_new_attempt_never_takes_the_last_attempt_s_report_for_its_own(monkeypatch) -> None:
    """Local mode serves every attempt's rank 0 at one URL: a report kept from attempt 1 must not
    stand for attempt 2 while its trainer starts up (it would say attempt 2 resumed from there)."""
    from kubetune import tick

    class Recorder:
        def __getattr__(self, name):  # create, delete, patch_status, post_event: nothing to do here
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tick, "observe", lambda state, progress=None: replace(state, progress=progress))
    monkeypatch.setattr(tick, "progress_url", lambda observed, settings: "http://127.0.0.1:9400/metrics")
    reports = iter([{"percent": 40.0, "resumedFrom": "ckpt/ep0-ba40-rank0.pt"}, None, None])
    reader = tick.ProgressReader(interval=0, read=lambda url: next(reports))
    b = training_body()
    for state in (_training(job(Component.TRAIN, 1, active=1)),
                  _training(failed(Component.TRAIN, 1, "NcclTimeout", attempt=1)),
                  _training(job(Component.TRAIN, 2, active=1))):  # its trainer does not answer yet
        plan = tick.reconcile(Recorder(), b, {"state": state}, SETTINGS, reader, NOW)
        b = {**b, "status": {**b["status"], **plan.status}}
    assert b["status"]["attempts"] == 2 and b["status"]["resume"]["attempt"] == 1
    assert events(plan) == []


def test_diverged_loss_does_not_break_the_status() -> None:
    b = training_body()
    progress = {"percent": 5.0, "batchesDone": 5, "batchesTotal": 100, "loss": float("nan")}
    _, b = run(b, _training(job(Component.TRAIN, 1, active=1), progress=progress))
    assert "loss" not in b["status"]["progress"]


def test_retryable_failure_restarts_all_ranks_as_a_new_attempt() -> None:
    b = training_body()
    attempt = failed(Component.TRAIN, 1, "NcclTimeout", attempt=1)
    plan, b = run(b, _training(attempt))
    assert deleted(plan) == ["demo-train-1"]
    assert plan.delete[0].propagation == "Foreground"
    assert created(plan) == ["demo-train-2"]
    assert plan.create[0]["spec"]["template"]["metadata"]["labels"][LABEL_ATTEMPT] == "2"
    assert b["status"]["attempts"] == 2 and b["status"]["phase"] == "Training"
    assert events(plan) == [EventType.RETRYING]
    assert "NcclTimeout" in plan.events[0].message and plan.events[0].k8s_type == "Warning"
    # Next: the old attempt is going away, the new one exists: nothing more to do.
    gone = replace(attempt, terminating=True)
    assert run(b, _training(gone, job(Component.TRAIN, 2)))[0].empty


def test_the_retrying_event_keeps_the_reason_and_exit_code_and_cuts_only_the_log_tail() -> None:
    b = training_body()
    log_tail = "first line of a long log " + "x" * 2000 + " Train time/batch: 12"
    crashed = job(Component.TRAIN, 1, pods=(pod("Failed", exit_code=137, message=log_tail),))
    plan, b = run(b, _training(crashed))
    retrying = plan.events[0]
    assert retrying.type is EventType.RETRYING
    assert "TrainingFailed: pod p0 exited with code 137: ..." in retrying.message
    assert retrying.message.endswith("Train time/batch: 12") and "first line" not in retrying.message
    assert len(retrying.message) < 600  # the detail is bounded (400), the summary in front of it is kept


def test_one_failed_rank_fails_the_attempt_before_the_job_says_so() -> None:
    b = training_body(resources={"nodes": 2}, globalBatchSize=16)
    ranks = (pod(index=0), pod("Failed", index=1, exit_code=1))
    plan, b = run(b, _training(job(Component.TRAIN, 1, active=1, completions=2, pods=ranks)))
    assert deleted(plan) == ["demo-train-1"] and created(plan) == ["demo-train-2"]


def test_permanent_training_failure_is_not_retried() -> None:
    b = training_body(resources={"nodes": 2}, globalBatchSize=16)
    ranks = (pod(index=0), pod("Failed", index=1, exit_code=2,
                               result={"ok": False, "reason": "InvalidInput", "permanent": True}))
    plan, b = run(b, _training(job(Component.TRAIN, 1, active=1, completions=2, pods=ranks)))
    assert b["status"]["phase"] == "Failed"
    assert condition(b, "Failed")["reason"] == "InvalidInput"
    assert created(plan) == []
    assert deleted(plan) == ["demo-train-1"]  # its other rank still runs: stop it
    assert b["status"]["attempts"] == 1


def test_a_permanently_failed_job_with_nothing_running_is_kept_for_its_logs() -> None:
    """Before the Job controller marks it Failed, the Job is already over: deleting it would
    take the pod, and its log with the full data-validation report, with it."""
    _, b = run(body(), Observed())
    plan, b = run(b, world(prep=failed(Component.PREP, 2, "DataValidationFailed")))
    assert condition(b, "Failed")["reason"] == "DataValidationFailed"
    assert deleted(plan) == []


def test_backoff_limit_exceeded() -> None:
    b = training_body(backoffLimit=1)
    plan, b = run(b, _training(failed(Component.TRAIN, 1, "NcclTimeout", attempt=1)))
    assert b["status"]["attempts"] == 2
    plan, b = run(b, _training(failed(Component.TRAIN, 1, "NcclTimeout", attempt=2)))
    assert b["status"]["phase"] == "Failed"
    assert condition(b, "Failed")["reason"] == "BackoffLimitExceeded"
    assert "2 attempts failed" in condition(b, "Failed")["message"]
    assert b["status"]["attempts"] == 2 and created(plan) == []


def test_backoff_limit_default_comes_from_the_operator() -> None:
    b = training_body()  # no backoffLimit in the spec
    strict = OperatorSettings(trainer_image="trainer:test", default_backoff_limit=0)
    plan = decide(b, _training(failed(Component.TRAIN, 1, "NcclTimeout", attempt=1)), NOW, strict)
    assert plan.status["phase"] == "Failed"
    b["spec"]["backoffLimit"] = 1
    plan = decide(b, _training(failed(Component.TRAIN, 1, "NcclTimeout", attempt=1)), NOW, strict)
    assert plan.status["attempts"] == 2


def test_job_deadline_is_permanent() -> None:
    b = training_body()
    attempt = job(Component.TRAIN, 1, failed_reason="DeadlineExceeded",
                  pods=(pod("Failed", exit_code=143),))
    _, b = run(b, _training(attempt))
    assert condition(b, "Failed")["reason"] == "DeadlineExceeded"


def test_operator_restart_with_training_running_creates_nothing() -> None:
    b = training_body()
    plan, _ = run(b, _training(job(Component.TRAIN, 1, active=1, pods=(pod(),))))
    assert plan.create == () and plan.delete == ()


def test_lost_status_write_does_not_reuse_an_attempt_name() -> None:
    b = training_body()  # status says attempt 1, but attempt 2 was created before a crash
    old = replace(failed(Component.TRAIN, 1, "X", attempt=1), terminating=True)
    plan, b = run(b, _training(old, job(Component.TRAIN, 2, active=1)))
    assert plan.create == () and plan.delete == ()
    assert b["status"]["attempts"] == 2


def test_stale_attempts_are_deleted() -> None:
    b = training_body()
    b["status"]["attempts"] = 2
    plan, _ = run(b, _training(failed(Component.TRAIN, 1, "X", attempt=1),
                               job(Component.TRAIN, 2, active=1)))
    assert deleted(plan) == ["demo-train-1"] and plan.create == ()


def test_service_is_recreated_if_missing() -> None:
    b = training_body()
    plan, _ = run(b, world(train=(job(Component.TRAIN, 1, active=1),)))
    assert created(plan) == ["demo-train"]


# --- finishing -------------------------------------------------------------------------------

def test_finished_training_starts_finalize() -> None:
    b = training_body()
    result = {"latestCheckpoint": "ckpt/ep1-ba100-rank0.pt", "mlflow": {"experimentId": "7",
                                                                        "runId": "r1"}}
    plan, b = run(b, _training(done(Component.TRAIN, result, attempt=1)))
    assert created(plan) == ["demo-finalize"]
    assert b["status"]["phase"] == "Registering"
    assert b["status"]["progress"]["percent"] == 100.0
    assert b["status"]["latestCheckpoint"] == "ckpt/ep1-ba100-rank0.pt"
    assert events(plan) == [EventType.CHECKPOINT_SAVED, EventType.TRAIN_FINISHED]
    assert condition(b, "Trained")["status"] == "True"


def test_missed_pod_success_is_seen_from_the_job() -> None:
    b = training_body()
    plan, b = run(b, _training(job(Component.TRAIN, 1, succeeded=1)))  # pods gone, Job says done
    assert b["status"]["phase"] == "Registering" and created(plan) == ["demo-finalize"]


def _registering() -> dict:
    b = training_body()
    return run(b, _training(done(Component.TRAIN, {}, attempt=1)))[1]


def _finalizing(finalize: JobState) -> Observed:
    return replace(_training(done(Component.TRAIN, {}, attempt=1)), finalize=finalize)


def test_a_finalize_job_done_before_its_pod_is_seen_waits_for_the_registered_model() -> None:
    b = _registering()
    just_done = job(Component.FINALIZE, complete=True, succeeded=1, completed_at=NOW - timedelta(seconds=5))
    plan, b = run(b, _finalizing(just_done))
    assert b["status"]["phase"] == "Registering" and "registeredModel" not in b["status"]
    assert plan.requeue_after and plan.requeue_after <= 5
    plan, b = run(b, _finalizing(done(Component.FINALIZE, {"registeredModel": MODEL})))
    assert b["status"]["phase"] == "Succeeded" and b["status"]["registeredModel"]["version"] == MODEL["version"]


def test_registration_completes_the_run() -> None:
    b = _registering()
    result = {"registeredModel": MODEL, "mlflow": {"experimentId": "7", "runId": "r1"}}
    plan, b = run(b, _finalizing(done(Component.FINALIZE, result)))
    status = b["status"]
    assert status["phase"] == "Succeeded"
    assert status["registeredModel"] == MODEL
    assert status["completionTime"] == "2026-03-01T12:00:00Z"
    assert events(plan) == [EventType.REGISTERED, EventType.COMPLETED]
    assert condition(b, "Succeeded") | {"lastTransitionTime": None} == {
        "type": "Succeeded", "status": "True", "reason": "Succeeded",
        "message": "registered main.ml.demo version 3", "observedGeneration": 1,
        "lastTransitionTime": None}
    assert condition(b, "Running")["status"] == "False"
    assert plan.requeue_after is None and not plan.delete_run


@pytest.mark.parametrize(("exit_code", "reason"), [(2, "InvalidInput"), (1, "TransientError")])
def test_failed_registration_fails_the_run(exit_code: int, reason: str) -> None:
    b = _registering()
    job_reason = "PodFailurePolicy" if exit_code == 2 else "BackoffLimitExceeded"
    _, b = run(b, _finalizing(failed(Component.FINALIZE, exit_code, reason, job_reason=job_reason)))
    assert b["status"]["phase"] == "Failed" and condition(b, "Failed")["reason"] == reason


# --- cancel, suspend, deadline, ttl ----------------------------------------------------------

def test_cancellation_stops_the_pods() -> None:
    b = training_body()
    b["metadata"]["annotations"] = {"kubetune.dev/cancel": "true"}
    observed = _training(job(Component.TRAIN, 1, active=1))
    plan, b = run(b, observed)
    assert b["status"]["phase"] == "Cancelled"
    assert deleted(plan) == ["demo-train-1"]
    assert events(plan) == [EventType.STOPPED]
    assert condition(b, "Succeeded")["reason"] == "Cancelled"
    gone = _training(replace(observed.train[0], terminating=True))
    assert run(b, gone)[0].empty


def test_suspend_stops_training_and_resume_keeps_the_attempt() -> None:
    b = training_body()
    running = job(Component.TRAIN, 1, active=1)
    b["spec"]["suspend"] = True
    plan, b = run(b, _training(running))
    assert b["status"]["phase"] == "Suspended" and deleted(plan) == ["demo-train-1"]
    assert condition(b, "Suspended")["status"] == "True"
    assert plan.requeue_after is None
    assert run(b, _training(replace(running, terminating=True)))[0].requeue_after == 5.0
    b["spec"]["suspend"] = False
    plan, b = run(b, _training(replace(running, terminating=True)))
    assert plan.create == () and b["status"]["phase"] == "Training"  # waits for the old Job
    plan, b = run(b, _training())
    assert created(plan) == ["demo-train-1"] and b["status"]["attempts"] == 1
    assert events(plan) == []


def test_suspended_before_start_creates_nothing() -> None:
    plan, b = run(body(suspend=True), Observed())
    assert plan.create == () and b["status"]["phase"] == "Suspended"
    assert "attempts" not in b["status"]


def test_run_deadline() -> None:
    b = training_body(activeDeadlineSeconds=3600)
    observed = _training(job(Component.TRAIN, 1, active=1))
    plan, b = run(b, observed, NOW + timedelta(seconds=3590))
    assert plan.requeue_after == 10  # wakes up in time, not at the next progress poll
    plan, b = run(b, observed, NOW + timedelta(seconds=3600))
    assert condition(b, "Failed")["reason"] == "DeadlineExceeded"
    assert deleted(plan) == ["demo-train-1"]


def test_ttl_after_finished_deletes_the_run() -> None:
    b = body(ttlSecondsAfterFinished=60, registerTo="main")  # invalid: fails at once
    plan, b = run(b, Observed())
    assert b["status"]["phase"] == "Failed"
    assert plan.delete_run is False and plan.requeue_after == 60
    later = decide(b, Observed(), NOW + timedelta(seconds=20), SETTINGS)
    assert later.requeue_after == 40 and not later.delete_run
    assert decide(b, Observed(), NOW + timedelta(seconds=60), SETTINGS).delete_run


def test_ttl_zero_deletes_at_once() -> None:
    b = _registering()
    b["spec"]["ttlSecondsAfterFinished"] = 0
    plan, _ = run(b, _finalizing(done(Component.FINALIZE, {"registeredModel": MODEL})))
    assert plan.delete_run


def test_terminal_phases_are_absorbing_but_stop_leftovers() -> None:
    b = training_body()
    b["status"]["phase"] = "Succeeded"
    leftover = job(Component.TRAIN, 1, active=1)
    plan = decide(b, _training(leftover), NOW, SETTINGS)
    assert plan.status == {} and plan.create == () and deleted(plan) == ["demo-train-1"]
    b["metadata"]["annotations"] = {"kubetune.dev/cancel": "true"}
    b["spec"]["suspend"] = True
    assert decide(b, _training(), NOW, SETTINGS).empty


# --- status shape ----------------------------------------------------------------------------

def test_transition_time_moves_only_when_the_status_does() -> None:
    _, b = run(body(), Observed())
    first = {c["type"]: c["lastTransitionTime"] for c in b["status"]["conditions"]}
    later = NOW + timedelta(minutes=5)
    _, b = run(b, world(prep=done(Component.PREP, {"dataStats": STATS})), later)
    times = {c["type"]: c["lastTransitionTime"] for c in b["status"]["conditions"]}
    assert times["Validated"] == first["Validated"]
    assert times["Running"] == first["Running"]  # still True, reason changed
    assert condition(b, "Running")["reason"] == "Training"
    assert times["DataPrepared"] == "2026-03-01T12:05:00Z"
    assert [c["type"] for c in b["status"]["conditions"]] == [
        "Validated", "DataPrepared", "Trained", "Registered", "Running", "Suspended", "Succeeded",
        "Failed"]


def test_events_are_capped_oldest_first_out() -> None:
    b = training_body()
    b["status"]["events"] = [{"type": "TRAIN_UPDATED", "time": "2026-03-01T11:00:00Z",
                              "message": str(i)} for i in range(SETTINGS.events_cap)]
    plan, b = run(b, _training(failed(Component.TRAIN, 1, "X", attempt=1)))
    assert len(b["status"]["events"]) == SETTINGS.events_cap
    assert b["status"]["events"][0]["message"] == "1"
    assert b["status"]["events"][-1]["type"] == "RETRYING"


def test_patch_holds_only_changed_keys() -> None:
    b = training_body()
    progress = {"percent": 3.0, "batchesDone": 3, "batchesTotal": 100}
    plan, _ = run(b, _training(job(Component.TRAIN, 1, active=1), progress=progress))
    assert set(plan.status) == {"progress"}


def test_phase_values_are_the_api_enum() -> None:
    _, b = run(body(), Observed())
    assert Phase(b["status"]["phase"]) is Phase.PREPARING_DATA


# --- the snapshot ----------------------------------------------------------------------------

def _snapshot_world(b: dict, **kw: Any) -> Observed:
    """What the shells observe once the run's first ConfigMap exists: its snapshot, parsed."""
    from kubetune.reconcile import observe

    config_map = next(m for m in decide(body(**b["spec"]), Observed(), NOW, SETTINGS).create
                      if m["kind"] == "ConfigMap")
    return replace(observe(config_maps=[config_map], services=[{"metadata": {"name": "demo-train"}}]),
                   prep=done(Component.PREP, {"dataStats": STATS}), **kw)


def _train_container(plan: Plan) -> dict:
    train = next(m for m in plan.create if m["metadata"]["name"].startswith("demo-train-"))
    return {"completions": train["spec"]["completions"],
            **train["spec"]["template"]["spec"]["containers"][0]["resources"]}


def test_an_edit_of_resources_mid_run_never_reaches_the_next_attempt() -> None:
    started = {"resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "4", "memory": "16Gi"},
               "globalBatchSize": 16}
    b = training_body(**started)
    observed = _snapshot_world(b, train=(failed(Component.TRAIN, 1, "NcclTimeout", attempt=1),))
    edited = {**b, "spec": {**b["spec"], "resources": {"nodes": 2, "gpusPerNode": 8, "cpu": "64",
                                                       "memory": "512Gi"}}}
    plan, after = run(edited, observed)
    assert created(plan) == ["demo-train-2"] and after["status"]["phase"] == "Training"
    assert _train_container(plan) == {
        "completions": 1,
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"}}


def test_the_controls_still_act_live_on_a_snapshotted_run() -> None:
    b = training_body()
    suspended = {**b, "spec": {**b["spec"], "suspend": True}}
    plan, after = run(suspended, _snapshot_world(b, train=(job(Component.TRAIN, 1, active=1),)))
    assert after["status"]["phase"] == "Suspended" and deleted(plan) == ["demo-train-1"]


def test_an_unreadable_snapshot_fails_the_run_loudly_and_stops_it() -> None:
    b = training_body()
    problem = "ConfigMap demo-config has no run.json: it was not written by this operator version"
    observed = world(snapshot_problem=problem, train=(job(Component.TRAIN, 1, active=1),))
    plan, after = run(b, observed)
    assert after["status"]["phase"] == "Failed" and not plan.create
    assert condition(after, "Failed")["reason"] == "SnapshotUnreadable"
    assert problem in condition(after, "Failed")["message"]
    assert condition(after, "Validated")["status"] == "True"  # the spec is fine; its snapshot is not
    assert deleted(run(after, observed)[0]) == ["demo-train-1"]  # the next look stops what runs


def test_a_status_written_by_another_version_is_read_raw_not_judged_as_the_spec():
    # An event type a newer operator wrote (a rollback, a downgrade): the status is decide's
    # own record, read as plain data; only the spec and metadata are parsed and judged.
    status = {"phase": "Training", "attempts": 1,
              "events": [{"type": "SOMETHING_NEWER", "message": "from a later version", "time": "2026-03-01T11:00:00Z"}]}
    plan = decide(body(status), world(train=(job(Component.TRAIN, 1),)), NOW, SETTINGS)
    assert plan.status.get("phase") != Phase.FAILED.value
    assert not plan.status.get("conditions") or all(
        c.get("reason") != "InvalidSpec" for c in plan.status.get("conditions", []))
