"""What exists now: a run's children, reduced to the facts `decide` needs.

`Observed` is the interface between a shell and the pure core. The Kubernetes shell lists the
run's children by label and calls `observe(...)` on the raw API objects; local mode builds
`JobState`s from its processes directly. Results are the steps' termination messages
(`kubetune_trainer.results`), parsed here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune_trainer.config import RunConfig
from kubetune_trainer.contract import (
    EXIT_PERMANENT,
    INFO_LATEST_CHECKPOINT,
    INFO_MLFLOW_EXPERIMENT_ID,
    INFO_MLFLOW_RUN_ID,
    INFO_RESUME_NOTE,
    INFO_RESUMED_FROM,
    METRIC_GAUGES,
    METRIC_INFO,
    METRIC_PROGRESS_RATIO,
    MLFLOW_EXPERIMENT_ID,
    MLFLOW_RUN_ID,
    PROGRESS_BATCHES_DONE,
    PROGRESS_BATCHES_TOTAL,
    PROGRESS_LATEST_CHECKPOINT,
    PROGRESS_MLFLOW,
    PROGRESS_PERCENT,
    PROGRESS_RESUME_NOTE,
    PROGRESS_RESUMED_FROM,
    RESULT_MESSAGE,
    RESULT_OK,
    RESULT_PERMANENT,
    RESULT_REASON,
)

from ..manifests import (
    COMPLETION_INDEX_ANNOTATION,
    JOB_NAME_LABEL,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    Component,
)
from ..settings import OperatorSettings
from ..snapshot import Snapshot, SnapshotUnreadable, read_snapshot
from ..timestamps import parse_time

JOB_NAME_LABELS = (JOB_NAME_LABEL, "job-name")  # the second: before Kubernetes 1.27


@dataclass(frozen=True)
class PodState:
    """One pod of a Job (a process in local mode)."""

    name: str
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    index: int = 0  # completion index: the node rank of a training pod
    exit_code: int | None = None
    result: Mapping[str, Any] | None = None  # the step's JSON result
    message: str = ""  # why it ended, when there is no JSON result (log tail, OOMKilled, ...)
    ip: str | None = None
    terminating: bool = False

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"

    @property
    def permanent(self) -> bool:
        """A user error: retrying cannot help (exit code 2, or the result says so)."""
        return self.exit_code == EXIT_PERMANENT or bool(self.result and self.result.get(RESULT_PERMANENT))


@dataclass(frozen=True)
class JobState:
    """One child Job. `failed_reason` is set once the Job itself has failed for good."""

    name: str
    component: Component
    attempt: int = 0  # training Jobs only
    suspended: bool = False
    active: int = 0
    succeeded: int = 0
    completions: int = 1
    complete: bool = False
    failed_reason: str | None = None
    failed_message: str = ""
    terminating: bool = False  # being deleted
    pods: tuple[PodState, ...] = ()
    completed_at: datetime | None = None  # the Job's status.completionTime

    @property
    def done(self) -> bool:
        """By the Job's status, or as soon as every completion index has a pod that succeeded:
        what the Job controller will count, a second or so before it writes it."""
        finished = {pod.index for pod in self.pods if pod.phase == "Succeeded"}
        return self.complete or self.succeeded >= self.completions or len(finished) >= self.completions

    @property
    def settled(self) -> bool:
        """Finished either way: nothing of it runs any more, no need to delete it to stop it.
        A permanently failed pod with nothing else running counts before the Job controller
        marks the Job Failed, so the pod (and its log with the full report) is kept."""
        stopped_for_good = self.active == 0 and any(p.failed and p.permanent for p in self.pods)
        return self.done or self.failed_reason is not None or stopped_for_good

    def result(self) -> Mapping[str, Any]:
        """The step's result: rank 0's when it reported one, else any successful pod's."""
        for pod in sorted(self.pods, key=lambda p: p.index):
            if pod.phase == "Succeeded" and pod.result and pod.result.get(RESULT_OK, True):
                return pod.result
        return {}


@dataclass(frozen=True)
class Failure:
    reason: str
    summary: str  # the step's own message, or which pod exited with which code
    permanent: bool
    log_tail: str = ""  # the end of the pod's log, when it died without a result

    @property
    def message(self) -> str:
        return f"{self.summary}: {self.log_tail}" if self.log_tail else self.summary

    def within(self, size: int) -> str:
        """The message in at most `size` characters: the summary (the exit code) is kept, the
        log tail loses its start, farthest from the crash."""
        if len(self.message) <= size:
            return self.message
        room = size - len(self.summary) - len(": ...")
        if not self.log_tail or room <= 0:
            return self.summary[: size - 3] + "..."
        return f"{self.summary}: ...{self.log_tail[-room:]}"


def job_failure(job: JobState, default_reason: str) -> Failure:
    """Why a Job failed, from its pods' results first, then the Job's own condition."""
    if job.failed_reason == "DeadlineExceeded":  # its pods were killed, their exit codes say nothing
        return Failure("DeadlineExceeded", job.failed_message or "the Job ran past its deadline", True)
    failed = sorted((p for p in job.pods if p.failed), key=lambda p: (not p.permanent, p.index))
    if failed:
        pod = failed[0]
        reason = str((pod.result or {}).get(RESULT_REASON) or default_reason)
        message = (pod.result or {}).get(RESULT_MESSAGE)
        if message:
            return Failure(reason, str(message), pod.permanent)
        # Died without a result: its exit code, then the end of its log.
        return Failure(reason, _exit_summary(pod), pod.permanent, pod.message)
    return Failure(default_reason, job.failed_message or f"Job {job.name} failed", False)


def _exit_summary(pod: PodState) -> str:
    if pod.exit_code is None:
        return f"pod {pod.name} failed"
    return f"pod {pod.name} exited with code {pod.exit_code}"


@dataclass(frozen=True)
class Observed:
    """The children of one run that exist now, and its latest training progress."""

    config_map: bool = False
    snapshot: Snapshot | None = None  # what the config map holds, when it can be read
    snapshot_problem: str | None = None  # why it cannot, when it cannot
    service: bool = False
    prep: JobState | None = None
    train: tuple[JobState, ...] = ()  # every training Job still there, any attempt
    finalize: JobState | None = None
    progress: Mapping[str, Any] | None = None  # progress.json's shape (contracts.md)

    @property
    def config(self) -> RunConfig | None:
        return self.snapshot.config if self.snapshot else None

    def train_job(self, attempt: int) -> JobState | None:
        return next((job for job in self.train if job.attempt == attempt), None)

    def jobs(self) -> tuple[JobState, ...]:
        return tuple(j for j in (self.prep, *self.train, self.finalize) if j is not None)


# --- from Kubernetes objects ------------------------------------------------------------------

def parse_termination_message(text: str | None) -> Mapping[str, Any] | None:
    """The step's JSON result, or None when the message is a log tail or empty."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return terminated
    return {}


# The kubelet's words for a referenced Secret (spec.secrets) or key that is not there. It keeps
# retrying, but a run that waits for a Secret nobody creates would hang forever: fail it instead.
_MISSING_SECRET = re.compile(r'secret "[^"]*" not found|couldn\'t find key \S+ in Secret \S+')


def _missing_secret(pod: Mapping[str, Any]) -> str | None:
    status = pod.get("status") or {}
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        message = waiting.get("message") or ""
        if waiting.get("reason") == "CreateContainerConfigError" and _MISSING_SECRET.search(message):
            return message
    return None


def pod_state(pod: Mapping[str, Any]) -> PodState:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if (missing := _missing_secret(pod)) is not None:
        return PodState(name=meta.get("name", ""), phase="Failed", result={
            RESULT_OK: False, RESULT_PERMANENT: True, RESULT_REASON: "SecretNotFound",
            RESULT_MESSAGE: f"{missing}: create it in namespace {meta.get('namespace')} (spec.secrets refers"
                       " to it), then create the run again"})
    terminated = _terminated(pod)
    text = terminated.get("message") or ""
    result = parse_termination_message(text)
    reason = terminated.get("reason") or status.get("reason") or ""
    index = (meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "0")
    return PodState(
        name=meta.get("name", ""),
        phase=status.get("phase") or "Pending",
        index=int(index) if str(index).isdigit() else 0,
        exit_code=terminated.get("exitCode"),
        result=result,
        message="" if result else (text.strip() or reason or status.get("message") or ""),
        ip=status.get("podIP"),
        terminating=bool(meta.get("deletionTimestamp")),
    )


def _condition(job: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


def job_state(job: Mapping[str, Any], pods: Iterable[PodState] = ()) -> JobState:
    meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    labels = meta.get("labels") or {}
    # FailureTarget comes first (1.31+): the Job has failed, its pods are still stopping.
    failed = _condition(job, "Failed", "FailureTarget")
    attempt = labels.get(LABEL_ATTEMPT, "0")
    return JobState(
        name=meta.get("name", ""),
        component=Component(labels.get(LABEL_COMPONENT, Component.PREP.value)),
        attempt=int(attempt) if attempt.isdigit() else 0,
        suspended=bool(spec.get("suspend")),
        active=status.get("active") or 0,
        succeeded=status.get("succeeded") or 0,
        completions=spec.get("completions") or 1,
        complete=_condition(job, "Complete", "SuccessCriteriaMet") is not None,
        failed_reason=(failed.get("reason") or "JobFailed") if failed else None,
        failed_message=(failed.get("message") or "") if failed else "",
        terminating=bool(meta.get("deletionTimestamp")),
        pods=tuple(pods),
        completed_at=parse_time(status.get("completionTime")),
    )


def _job_of(pod: Mapping[str, Any]) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return next((labels[key] for key in JOB_NAME_LABELS if key in labels), None)


def config_snapshot(config_map: Mapping[str, Any]) -> tuple[Snapshot | None, str | None]:
    """(the snapshot, None), or (None, why it cannot be read)."""
    name = (config_map.get("metadata") or {}).get("name", "")
    try:
        return read_snapshot(name, config_map.get("data") or {}), None
    except SnapshotUnreadable as error:
        return None, str(error)


def observe(*, jobs: Iterable[Mapping[str, Any]] = (), pods: Iterable[Mapping[str, Any]] = (),
            config_maps: Iterable[Mapping[str, Any]] = (),
            services: Iterable[Mapping[str, Any]] = (),
            progress: Mapping[str, Any] | None = None) -> Observed:
    """Observed from the run's children as the API returns them (listed by `kubetune.dev/run`)."""
    pods_by_job: dict[str, list[PodState]] = {}
    for pod in pods:
        pods_by_job.setdefault(_job_of(pod) or "", []).append(pod_state(pod))
    states = [job_state(job, pods_by_job.get(job["metadata"]["name"], ())) for job in jobs]
    by_component = {c: [s for s in states if s.component is c] for c in Component}
    config_maps = list(config_maps)
    snapshot, problem = config_snapshot(config_maps[0]) if config_maps else (None, None)
    return Observed(
        config_map=bool(config_maps),
        snapshot=snapshot,
        snapshot_problem=problem,
        service=any(True for _ in services),
        prep=next(iter(by_component[Component.PREP]), None),
        train=tuple(sorted(by_component[Component.TRAIN], key=lambda j: j.attempt)),
        finalize=next(iter(by_component[Component.FINALIZE]), None),
        progress=progress,
    )


# --- progress --------------------------------------------------------------------------------

def progress_url(observed: Observed, settings: OperatorSettings) -> str | None:
    """Where rank 0 of the newest live training attempt serves its metrics, if it runs."""
    live = [job for job in observed.train if not job.terminating and not job.settled]
    if not live:
        return None
    job = max(live, key=lambda j: j.attempt)
    rank0 = next((p for p in job.pods if p.index == 0 and p.phase == "Running" and p.ip), None)
    return f"http://{rank0.ip}:{settings.metrics_port}/metrics" if rank0 else None


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_COUNTS = (PROGRESS_BATCHES_DONE, PROGRESS_BATCHES_TOTAL)
_ESCAPED = re.compile(r"\\(.)")  # the text format escapes \, " and newlines in label values


def _unescape(value: str) -> str:
    return _ESCAPED.sub(lambda m: "\n" if m[1] == "n" else m[1], value)


def parse_metrics(text: str) -> dict[str, Any] | None:
    """The trainer's Prometheus text → the `progress.json` shape; None if it has no progress."""
    progress: dict[str, Any] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, value = match["name"], float(match["value"])
        if name == METRIC_PROGRESS_RATIO:
            progress[PROGRESS_PERCENT] = value * 100
        elif name in METRIC_GAUGES:
            key = METRIC_GAUGES[name]
            progress[key] = int(value) if key in _COUNTS else value
        elif name == METRIC_INFO:
            labels = dict(_LABEL.findall(match["labels"] or ""))
            for label, key in ((INFO_LATEST_CHECKPOINT, PROGRESS_LATEST_CHECKPOINT),
                               (INFO_RESUMED_FROM, PROGRESS_RESUMED_FROM), (INFO_RESUME_NOTE, PROGRESS_RESUME_NOTE)):
                if labels.get(label):
                    progress[key] = _unescape(labels[label])
            progress[PROGRESS_MLFLOW] = {MLFLOW_EXPERIMENT_ID: labels.get(INFO_MLFLOW_EXPERIMENT_ID) or None,
                                         MLFLOW_RUN_ID: labels.get(INFO_MLFLOW_RUN_ID) or None}
    return progress if PROGRESS_PERCENT in progress else None
