"""`decide(body, observed, now, settings) -> Plan`: the TrainingRun phase machine, pure.

Level-triggered: every call recomputes the whole status from the resource, what exists now and
the clock, so a missed event or an operator restart converges to the same answer. Steps record
their completion as conditions (DataPrepared, Trained, Registered), which is what lets a step
never run twice even after its Job is gone. One call cascades through every step that is done,
so deciding again after the plan is applied asks for nothing more.

Order of the checks: a terminal phase is absorbing; an invalid spec fails at once; then
cancellation, the run's deadline, and the steps (config snapshot → data prep → training →
finalize), with `spec.suspend` stopping whatever runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubetune_trainer.config import RunConfig
from kubetune_trainer.contract import (
    PROGRESS_BATCHES_DONE,
    PROGRESS_BATCHES_TOTAL,
    PROGRESS_ETA_SECONDS,
    PROGRESS_LATEST_CHECKPOINT,
    PROGRESS_LOSS,
    PROGRESS_MFU,
    PROGRESS_MLFLOW,
    PROGRESS_PERCENT,
    PROGRESS_TOKENS_PER_SECOND,
    RESULT_DATA_STATS,
    RESULT_LATEST_CHECKPOINT,
    RESULT_MLFLOW,
    RESULT_REGISTERED_MODEL,
    RESULT_RESUME_NOTE,
    RESULT_RESUMED_FROM,
)
from pydantic import BaseModel, ValidationError

from ..api import (
    TERMINAL,
    DataStats,
    EventType,
    MlflowInfo,
    Phase,
    Progress,
    RegisteredModel,
    Resume,
    SpecError,
    TrainingRun,
    parse_training_run,
    plain,
)
from ..manifests import (
    BuildContext,
    build_config_map,
    build_finalize_job,
    build_prep_job,
    build_service,
    build_train_job,
)
from ..resolve import ResolveError, backoff_limit, resolve_config
from ..settings import OperatorSettings
from ..snapshot import UNREADABLE, SnapshotUnreadable
from .observe import JobState, Observed, job_failure
from .plan import ChildRef, Plan
from .status import (
    DATA_PREPARED,
    FAILED,
    REGISTERED,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    TRAINED,
    VALIDATED,
    Want,
    derive_events,
    event_entries,
    is_true,
    merge_conditions,
    parse_time,
    timestamp,
)

ACTIVE_PHASES = frozenset({Phase.PREPARING_DATA, Phase.TRAINING, Phase.REGISTERING})
WAIT_SECONDS = 5.0  # re-check soon while a deleted child is still going away
REPORT_GRACE = timedelta(seconds=60)  # how long a done Job's pod report may lag behind the Job
MAX_EVENT_MESSAGE = 1024
RETRY_DETAIL = 400  # characters of the failure detail kept in a RETRYING event


@dataclass
class _Draft:
    """The outcome one `decide` call assembles; it lives only for that call."""

    status: dict[str, Any]
    phase: Phase
    suspended: bool = False
    reason: str = ""
    message: str = ""
    invalid: bool = False
    queue: str | None = None  # the Kueue LocalQueue the training Job waits in
    create: list[Mapping[str, Any]] = field(default_factory=list)
    delete: list[ChildRef] = field(default_factory=list)
    notes: dict[EventType, str] = field(default_factory=dict)
    requeue: list[float] = field(default_factory=list)

    def add(self, manifest: Mapping[str, Any]) -> None:
        if not self.suspended:  # a suspended run starts nothing
            self.create.append(manifest)

    def remove(self, job: JobState, namespace: str) -> None:
        ref = ChildRef("Job", job.name, namespace)
        if ref not in self.delete:
            self.delete.append(ref)

    def end(self, phase: Phase, reason: str, message: str) -> None:
        self.phase, self.reason, self.message = phase, reason, message

    def fail(self, reason: str, message: str) -> None:
        self.end(Phase.FAILED, reason, message)

    @property
    def ended(self) -> bool:
        return self.phase in TERMINAL


@dataclass(frozen=True)
class _World:
    """The inputs of one call, with what is derived from them once."""

    run: TrainingRun
    observed: Observed
    settings: OperatorSettings
    now: datetime
    config: RunConfig

    def context(self, attempt: int = 1) -> BuildContext:
        return BuildContext(self.run, self.settings, self.config, attempt)

    @property
    def namespace(self) -> str:
        return self.run.metadata.namespace


# --- entry point -----------------------------------------------------------------------------

def decide(body: Mapping[str, Any], observed: Observed, now: datetime,
           settings: OperatorSettings) -> Plan:
    """The plan for a TrainingRun `body` (the resource as the API returns it) given `observed`."""
    old = plain(body.get("status") or {})
    metadata = body.get("metadata") or {}
    if old.get("phase") in {p.value for p in TERMINAL}:
        return _settled(body, old, observed, now)
    draft = _Draft(status=dict(old), phase=Phase(old.get("phase") or Phase.PENDING.value))
    try:
        world = _world(body, observed, now, settings)
    except SpecError as error:
        draft.invalid = True
        draft.fail(SpecError.reason, str(error))
    except SnapshotUnreadable as error:
        draft.fail(UNREADABLE, str(error))
    else:
        _advance(world, draft)
    return _plan(old, draft, metadata.get("generation"), now, settings, ttl=_ttl(body))


def _ttl(body: Mapping[str, Any]) -> int | None:
    """ttlSecondsAfterFinished, read raw: an invalid run is cleaned up after it too."""
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    return ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0 else None


def _world(body: Mapping[str, Any], observed: Observed, now: datetime,
           settings: OperatorSettings) -> _World:
    """Parse and resolve everything up front: any problem is the user's, raised as SpecError.
    A run that has started acts on its snapshot's spec (with the live controls), never on edits."""
    resource = {key: value for key, value in body.items() if key != "status"}  # read raw, in `decide`
    run = parse_training_run(resource)
    if observed.snapshot_problem:
        raise SnapshotUnreadable(observed.snapshot_problem)
    if observed.snapshot is not None:
        run = parse_training_run({**resource, "spec": observed.snapshot.frozen_spec(body.get("spec") or {})})
    try:
        config = observed.config or resolve_config(run, settings)
    except ResolveError as error:
        raise SpecError(error.field, str(error).removeprefix(f"{error.field}: ")) from None
    return _World(run, observed, settings, now, config)


def _advance(world: _World, draft: _Draft) -> None:
    run = world.run
    if run.metadata.annotations.get(world.settings.cancel_annotation) == "true":
        draft.end(Phase.CANCELLED, "Cancelled",
                  f"cancelled by the {world.settings.cancel_annotation} annotation")
    elif not _deadline_exceeded(world, draft):
        draft.suspended = run.spec.suspend
        draft.queue = run.spec.scheduling.queue_name
        if not world.observed.config_map:
            draft.add(build_config_map(world.context()))
        if _prepare(world, draft) and _train(world, draft) and _register(world, draft):
            model = draft.status.get("registeredModel") or {}
            draft.end(Phase.SUCCEEDED, "Succeeded",
                      f"registered {model.get('name')} version {model.get('version')}")
    if draft.suspended and not draft.ended:
        draft.end(Phase.SUSPENDED, "Suspended", "spec.suspend is true")
    if draft.ended or draft.phase is Phase.SUSPENDED:
        _stop_running(world, draft)


def _deadline_exceeded(world: _World, draft: _Draft) -> bool:
    """activeDeadlineSeconds counts wall-clock time from the run's start, suspension included."""
    deadline = world.run.spec.active_deadline_seconds
    started = parse_time(draft.status.get("startTime")) or world.now
    if deadline is None:
        return False
    left = deadline - (world.now - started).total_seconds()
    if left > 0:
        draft.requeue.append(left)
        return False
    draft.fail("DeadlineExceeded", f"the run did not finish within activeDeadlineSeconds ({deadline})")
    return True


def _stop_running(world: _World, draft: _Draft) -> None:
    for job in world.observed.jobs():
        if not job.settled and not job.terminating:
            draft.remove(job, world.namespace)


# --- steps -----------------------------------------------------------------------------------

def _run_job(world: _World, draft: _Draft, job: JobState | None,
             build: Callable[[], Mapping[str, Any]], phase: Phase, default_reason: str) -> bool:
    """Drive one step's Job; True once it has succeeded."""
    if job is None:
        manifest = build()
        draft.add(manifest)
        draft.phase = Phase.QUEUED if manifest["spec"].get("suspend") else phase
        return False
    if job.terminating:  # deleted (suspend, retry): wait until it is gone, then recreate it
        draft.phase = phase
        draft.requeue.append(WAIT_SECONDS)
        return False
    if job.done:
        return True
    if job.failed_reason is not None or any(p.failed and p.permanent for p in job.pods):
        failure = job_failure(job, default_reason)
        draft.fail(failure.reason, failure.message)
        return False
    draft.phase = Phase.QUEUED if job.suspended else phase
    return False


def _prepare(world: _World, draft: _Draft) -> bool:
    if is_true(draft.status, DATA_PREPARED):
        return True
    job = world.observed.prep
    if not _run_job(world, draft, job, lambda: build_prep_job(world.context()),
                    Phase.PREPARING_DATA, "DataPreparationFailed"):
        return False
    if _waiting_for_report(world, draft, job, RESULT_DATA_STATS, Phase.PREPARING_DATA):
        return False
    _put(draft.status, "dataStats", DataStats, job.result().get(RESULT_DATA_STATS))
    draft.notes[EventType.DATA_VALIDATED] = _stats_message(draft.status.get("dataStats"))
    _mark(draft, DATA_PREPARED)
    return True


def _waiting_for_report(world: _World, draft: _Draft, job: JobState, key: str, phase: Phase) -> bool:
    """True (and the step stays in `phase`) while a done Job's report `key` may still come: the
    Job says it is done but no pod of it that succeeded has been seen (a watch that restarts
    shows the Job before its pod), for a while after the Job completed. After that (its pods
    gone for good) the step goes on without the report."""
    if job.result().get(key) or any(pod.phase == "Succeeded" for pod in job.pods) or job.completed_at is None:
        return False
    if world.now - job.completed_at >= REPORT_GRACE:
        return False
    draft.phase = phase
    draft.requeue.append(WAIT_SECONDS)
    return True


def _current_attempt(world: _World, draft: _Draft) -> int:
    """The max of what status says and what exists: a lost status write never reuses a name."""
    seen = [job.attempt for job in world.observed.train]
    return max([draft.status.get("attempts") or 0, 1, *seen])


def _attempt_failed(job: JobState) -> bool:
    # backoffLimit 0: one failed rank fails the attempt. Pods being deleted (Kueue preempting,
    # a suspension) did not fail.
    return job.failed_reason is not None or any(p.failed and not p.terminating for p in job.pods)


def _retry_or_fail(world: _World, draft: _Draft, job: JobState, attempt: int) -> int | None:
    """After a failed attempt: the next attempt's number, or None when the run has failed."""
    failure = job_failure(job, "TrainingFailed")
    limit = backoff_limit(world.run, world.settings)
    if failure.permanent:
        draft.fail(failure.reason, failure.message)
        return None
    if attempt > limit:
        draft.fail("BackoffLimitExceeded", f"{attempt} attempts failed (backoffLimit {limit}); "
                   f"the last: {failure.reason}: {failure.message}")
        return None
    draft.remove(job, world.namespace)
    # What happens next first; of the failure, only the log tail's start is cut, never its exit code.
    draft.notes[EventType.RETRYING] = (
        f"attempt {attempt} failed, restarting all ranks from the latest checkpoint as attempt "
        f"{attempt + 1} of {limit + 1}: {failure.reason}: {failure.within(RETRY_DETAIL)}")
    return attempt + 1


def _train(world: _World, draft: _Draft) -> bool:
    if is_true(draft.status, TRAINED):
        return True
    attempt = _current_attempt(world, draft)
    for stale in world.observed.train:
        if stale.attempt != attempt and not stale.terminating:
            draft.remove(stale, world.namespace)
    job = world.observed.train_job(attempt)
    retried = False
    if job is not None and not job.terminating and _attempt_failed(job):
        next_attempt = _retry_or_fail(world, draft, job, attempt)
        if next_attempt is None:
            return False
        attempt, job, retried = next_attempt, None, True
    if job is not None or retried or not draft.suspended:  # an attempt counts once it exists
        draft.status["attempts"] = attempt
    done = _run_job(world, draft, job, lambda: build_train_job(world.context(attempt)),
                    Phase.TRAINING, "TrainingFailed")
    if not world.observed.service:  # after the Job: the ranks look their names up once they run
        draft.add(build_service(world.context(attempt)))
    if not done:
        # A Job created just now has not run: the report read this tick is its predecessor's.
        _record_progress(world, draft, this_attempt=job is not None)
        return False
    _record_training_result(draft, job.result())
    _mark(draft, TRAINED)
    return True


def _register(world: _World, draft: _Draft) -> bool:
    if is_true(draft.status, REGISTERED):
        return True
    job = world.observed.finalize
    if not _run_job(world, draft, job, lambda: build_finalize_job(world.context()),
                    Phase.REGISTERING, "RegistrationFailed"):
        return False
    if _waiting_for_report(world, draft, job, RESULT_REGISTERED_MODEL, Phase.REGISTERING):
        return False
    result = job.result()
    _put(draft.status, "registeredModel", RegisteredModel, result.get(RESULT_REGISTERED_MODEL))
    _put(draft.status, "mlflow", MlflowInfo, result.get(RESULT_MLFLOW))
    _mark(draft, REGISTERED)
    return True


# --- status content --------------------------------------------------------------------------

def _mark(draft: _Draft, type_: str) -> None:
    """Record a finished step now, so the rest of this call builds on it."""
    conditions = [c for c in draft.status.get("conditions") or [] if c.get("type") != type_]
    draft.status["conditions"] = [*conditions, {"type": type_, "status": "True"}]


def _put(status: dict[str, Any], key: str, model: type[BaseModel], value: Any) -> None:
    """Store a step's report in its API shape; a malformed report keeps what status had."""
    if not value:
        return
    try:
        status[key] = model.model_validate(value).model_dump(by_alias=True, mode="json",
                                                             exclude_none=True)
    except ValidationError:
        return


def _record_progress(world: _World, draft: _Draft, this_attempt: bool) -> None:
    report = world.observed.progress
    if not report or draft.phase is not Phase.TRAINING or draft.suspended:
        return
    if this_attempt:
        _record_resume(draft, report)
    batches_done, batches_total = report.get(PROGRESS_BATCHES_DONE), report.get(PROGRESS_BATCHES_TOTAL)
    _put(draft.status, "progress", Progress, {
        "percent": min(max(float(report.get(PROGRESS_PERCENT) or 0.0), 0.0), 100.0),
        "currentDuration": f"{batches_done}ba" if batches_done is not None else None,
        "totalDuration": f"{batches_total}ba" if batches_total is not None else None,
        "tokensPerSecond": report.get(PROGRESS_TOKENS_PER_SECOND),
        "loss": report.get(PROGRESS_LOSS),
        "etaSeconds": report.get(PROGRESS_ETA_SECONDS),
        "mfu": report.get(PROGRESS_MFU),
    })
    if report.get(PROGRESS_LATEST_CHECKPOINT):
        draft.status["latestCheckpoint"] = report[PROGRESS_LATEST_CHECKPOINT]
    _put(draft.status, "mlflow", MlflowInfo, report.get(PROGRESS_MLFLOW))


def _record_training_result(draft: _Draft, result: Mapping[str, Any]) -> None:
    progress = dict(draft.status.get("progress") or {})
    draft.status["progress"] = {**progress, "percent": 100.0, "etaSeconds": 0.0}
    if progress.get("totalDuration"):
        draft.status["progress"]["currentDuration"] = progress["totalDuration"]
    if result.get(RESULT_LATEST_CHECKPOINT):
        draft.status["latestCheckpoint"] = result[RESULT_LATEST_CHECKPOINT]
    _put(draft.status, "mlflow", MlflowInfo, result.get(RESULT_MLFLOW))
    _record_resume(draft, result)


def _record_resume(draft: _Draft, report: Mapping[str, Any]) -> None:
    """Where this attempt started, from its progress report or its result (the same keys)."""
    checkpoint, note = report.get(RESULT_RESUMED_FROM), report.get(RESULT_RESUME_NOTE)
    if checkpoint or note:
        _put(draft.status, "resume", Resume,
             {"attempt": draft.status.get("attempts") or 1, "checkpoint": checkpoint, "note": note})


def _stats_message(stats: Mapping[str, Any] | None) -> str:
    if not stats:
        return "training data prepared"
    return (f"training data prepared: {stats.get('samples', 0)} samples, "
            f"{stats.get('tokens', 0)} tokens, {stats.get('truncatedSamples', 0)} truncated, "
            f"{stats.get('droppedSamples', 0)} dropped (nothing to learn), "
            f"packing efficiency {float(stats.get('packingEfficiency', 0.0)):.0%}")


def _step_want(done: bool, reason: str, message: str, pending: str) -> Want:
    return Want("True", reason, message) if done else Want("False", pending)


def _queued_message(queue: str | None) -> str:
    return (f"the training Job waits in Kueue LocalQueue {queue} until its ClusterQueue has "
            f"quota for it; its Workload says why (kubectl get workloads)")


def _wanted_conditions(draft: _Draft) -> dict[str, Want]:
    phase, status = draft.phase, draft.status
    pending = draft.reason if draft.ended else phase.value
    model = status.get("registeredModel") or {}
    return {
        VALIDATED: Want("False", draft.reason, draft.message) if draft.invalid
        else Want("True", "SpecValid", "the spec is valid"),
        DATA_PREPARED: _step_want(is_true(status, DATA_PREPARED), "DataPrepared",
                                  _stats_message(status.get("dataStats")), pending),
        TRAINED: _step_want(is_true(status, TRAINED), "Trained",
                            f"training finished after {status.get('attempts') or 1} attempt(s)",
                            pending),
        REGISTERED: _step_want(is_true(status, REGISTERED), "Registered",
                               f"registered {model.get('name')} version {model.get('version')}",
                               pending),
        RUNNING: Want("False", phase.value, _queued_message(draft.queue)) if phase is Phase.QUEUED
        else Want("True" if phase in ACTIVE_PHASES else "False", phase.value),
        SUSPENDED: Want("True", "Suspended", "spec.suspend is true") if phase is Phase.SUSPENDED
        else Want("False", phase.value),
        SUCCEEDED: Want("True" if phase is Phase.SUCCEEDED else "False", pending,
                        draft.message if draft.ended else ""),
        FAILED: Want("True", draft.reason, draft.message) if phase is Phase.FAILED
        else Want("False", phase.value),
    }


# --- the plan --------------------------------------------------------------------------------

def _plan(old: Mapping[str, Any], draft: _Draft, generation: int | None, now: datetime,
          settings: OperatorSettings, ttl: int | None) -> Plan:
    new = draft.status
    new["phase"] = draft.phase.value
    new["conditions"] = merge_conditions(old.get("conditions") or [], _wanted_conditions(draft),
                                         generation, now)
    new.setdefault("startTime", timestamp(now))
    if draft.ended:
        new.setdefault("completionTime", timestamp(now))
        draft.notes.setdefault({Phase.FAILED: EventType.FAILED, Phase.CANCELLED: EventType.STOPPED,
                                Phase.SUCCEEDED: EventType.COMPLETED}[draft.phase],
                               f"{draft.reason}: {draft.message}")
    if generation is not None:
        new["observedGeneration"] = generation
    events = derive_events(old, new, {k: _short(v) for k, v in draft.notes.items()}, now)
    new["events"] = event_entries(old.get("events") or [], events, settings.events_cap)
    requeue = list(draft.requeue)
    if draft.ended and ttl is not None:
        requeue.append(float(ttl))
    elif not draft.ended and draft.phase is not Phase.SUSPENDED:
        requeue.append(settings.progress_interval_seconds)
    return Plan(status={k: v for k, v in new.items() if old.get(k) != v},
                create=tuple(draft.create), delete=tuple(draft.delete), events=tuple(events),
                requeue_after=min(requeue) if requeue else None,
                delete_run=draft.ended and ttl == 0)


def _settled(body: Mapping[str, Any], old: Mapping[str, Any], observed: Observed,
             now: datetime) -> Plan:
    """A finished run changes no more; it only stops leftovers and waits out its TTL."""
    namespace = (body.get("metadata") or {}).get("namespace", "default")
    delete = tuple(ChildRef("Job", job.name, namespace) for job in observed.jobs()
                   if not job.settled and not job.terminating)
    ttl, finished = _ttl(body), parse_time(old.get("completionTime"))
    if ttl is None or finished is None:
        return Plan(delete=delete)
    left = ttl - (now - finished).total_seconds()
    return Plan(delete=delete, delete_run=left <= 0, requeue_after=left if left > 0 else None)


def _short(message: str) -> str:
    return message if len(message) <= MAX_EVENT_MESSAGE else message[: MAX_EVENT_MESSAGE - 3] + "..."

