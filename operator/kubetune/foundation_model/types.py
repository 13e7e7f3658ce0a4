"""What the SDK hands back, as the managed service's SDK (databricks-genai 1.1.8) shaped it.

`RunStatus`, `TrainingEvent`, `TrainingRun` and `TrainingModelConstants` keep that SDK's names,
attributes and methods, so code written against it reads kubetune's runs unchanged. Everything
here is pure: `run_from_resource` maps a TrainingRun resource (a dict, as the API server returns
it) to a `TrainingRun` at a given moment; the I/O lives in `client.py`.
"""

from __future__ import annotations

import builtins
import html
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

from pydantic import ValidationError

from ..api import (
    OWNER_ANNOTATION,
    Phase,
    Progress,
    RegisteredModel,
    SpecError,
    TrainingRunSpec,
    TrainingRunStatus,
    parse_training_run,
)
from ..models_catalog import ModelInfo
from ..settings import OperatorSettings

CANCEL_ANNOTATION = OperatorSettings.model_fields["cancel_annotation"].default


class RunStatus(Enum):
    """The managed service's run statuses, ordered as runs go through them."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    TERMINATING = "TERMINATING"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"

    def __str__(self) -> str:
        return self.value

    def _rank(self) -> int:
        return _ORDER.index(self)

    def __lt__(self, other: RunStatus) -> bool:
        if not isinstance(other, RunStatus):
            raise TypeError(f"cannot compare the order of RunStatus and {type(other).__name__}")
        return self._rank() < other._rank()

    def __le__(self, other: RunStatus) -> bool:
        return self == other or self < other

    def __gt__(self, other: RunStatus) -> bool:
        return not self <= other

    def __ge__(self, other: RunStatus) -> bool:
        return not self < other

    def before(self, other: RunStatus, inclusive: bool = False) -> bool:
        return self < other or (inclusive and self == other)

    def after(self, other: RunStatus, inclusive: bool = False) -> bool:
        return self > other or (inclusive and self == other)

    def is_terminal(self) -> bool:
        """COMPLETED, STOPPED and FAILED: the run changes no more."""
        return self in TERMINAL_STATUSES

    @classmethod
    def from_string(cls, run_status: str | RunStatus) -> RunStatus:
        """The status of that name (any case); UNKNOWN for a name that is none."""
        if isinstance(run_status, RunStatus):
            return run_status
        try:
            return cls[str(run_status).strip().upper()]
        except KeyError:
            return cls.UNKNOWN

    @property
    def display_name(self) -> str:
        return self.value.title()


# Earliest first; the service sorts UNKNOWN before everything.
_ORDER = [RunStatus.UNKNOWN, RunStatus.PENDING, RunStatus.QUEUED, RunStatus.STARTING, RunStatus.RUNNING,
          RunStatus.TERMINATING, RunStatus.COMPLETED, RunStatus.STOPPED, RunStatus.FAILED]
TERMINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.STOPPED, RunStatus.FAILED})

_BY_PHASE = {
    Phase.PENDING: RunStatus.PENDING,
    Phase.QUEUED: RunStatus.QUEUED,
    Phase.SUSPENDED: RunStatus.QUEUED,  # waits, like a queued run, until spec.suspend is lifted
    Phase.PREPARING_DATA: RunStatus.STARTING,
    Phase.TRAINING: RunStatus.RUNNING,
    Phase.REGISTERING: RunStatus.RUNNING,  # the service stays RUNNING until the model is registered
    Phase.SUCCEEDED: RunStatus.COMPLETED,
    Phase.CANCELLED: RunStatus.STOPPED,
    Phase.FAILED: RunStatus.FAILED,
}


def status_from_phase(phase: str | None, stopping: bool = False) -> RunStatus:
    """The service's status for a run's phase; `stopping`: cancel or deletion asked, not done yet."""
    if not phase:
        phase = Phase.PENDING.value
    try:
        status = _BY_PHASE[Phase(phase)]
    except ValueError:
        return RunStatus.UNKNOWN
    return RunStatus.TERMINATING if stopping and not status.is_terminal() else status


def seconds_to_str(seconds: float) -> str:
    """A duration as the service wrote ETAs: 45s, 12min, 3hr, 2d."""
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        return f"{int(seconds / 60)}min"
    if seconds < 24 * 3600:
        return f"{int(seconds / 3600)}hr"
    return f"{int(seconds / 3600 / 24)}d"


class ObjectList(builtins.list):
    """A list that renders as a table in a notebook (the service's `ObjectList`)."""

    def __init__(self, items=(), columns: Mapping[str, str] | None = None):
        super().__init__(items)
        self.columns = dict(columns or {})

    @property
    def display_columns(self) -> dict[str, str]:
        return self.columns

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(label)}</th>" for label in self.columns.values())
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_shown(getattr(item, attr, None)))}</td>"
                             for attr in self.columns) + "</tr>"
            for item in self)
        return f"<table border='1' class='dataframe'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    def to_pandas(self):
        import pandas as pd  # optional, as in the service's SDK

        return pd.DataFrame({label: [getattr(item, attr, None) for item in self]
                             for attr, label in self.columns.items()})


def _shown(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


@dataclass
class TrainingEvent:
    """One event of a run: type (CREATED, TRAIN_STARTED, ..., COMPLETED), time and message."""

    type: str
    time: datetime
    message: str

    def is_terminal_state(self) -> bool:
        return self.type in TERMINAL_EVENTS

    def __str__(self) -> str:
        return f"{self.time:%Y-%m-%d %H:%M:%S}  {self.type:<16} {self.message}"


TERMINAL_EVENTS = frozenset({"COMPLETED", "FAILED", "STOPPED", "CANCELED"})
EVENT_COLUMNS = {"type": "Type", "time": "Time", "message": "Message"}
RUN_COLUMNS = {"name": "Name", "run_progress": "Status", "model": "Model", "learning_rate": "Learning Rate",
               "training_duration": "Training Duration", "train_data_path": "Train Data Path",
               "register_to": "Register To"}
MODEL_COLUMNS = {"display_name": "Model Name", "name": "Input Name", "max_context_length": "Maximum Context Length"}
_BAR = 10


@dataclass
class TrainingModelConstants:
    """A model kubetune knows by name (`get_models()`), with the longest context it takes."""

    name: str
    display_name: str
    max_context_length: int


def model_constants(info: ModelInfo) -> TrainingModelConstants:
    display = info.name.split("/", 1)[-1].replace("-", " ")
    return TrainingModelConstants(info.name, display, info.max_context_length)


@dataclass
class TrainingRun:
    """A fine-tuning run: the attributes of the service's `TrainingRun`, plus where it lives.

    kubetune adds `namespace`, `phase` (the resource's own phase), `progress` (percent, tokens/s,
    loss, ETA), `latest_checkpoint`, `registered_model` and `resource` (the TrainingRun as the
    API server returned it). `data_prep_cluster_id` is always None: data preparation runs in a Job.
    """

    name: str
    status: RunStatus
    created_by: str

    model: str | None = None
    save_folder: str | None = None
    train_data_path: str | None = None
    register_to: str | None = None
    submitted_experiment_path: str | None = None
    task_type: str | None = "INSTRUCTION_FINETUNE"
    eval_data_path: str | None = None
    eval_prompts: builtins.list[str] | None = None
    custom_weights_path: str | None = None
    training_duration: str | None = None
    learning_rate: float | None = None
    context_length: int | None = None
    data_prep_cluster_id: str | None = None

    details: str | None = None

    created_at: datetime | None = None
    started_at: datetime | None = None
    estimated_end_time: datetime | None = None
    formatted_eta: str | None = None
    completed_at: datetime | None = None

    submitted_config: TrainingRunSpec | None = None
    events: ObjectList | None = None

    experiment_id: str | None = None
    run_id: str | None = None

    namespace: str = "default"
    phase: str = Phase.PENDING.value
    progress: Progress | None = None
    latest_checkpoint: str | None = None
    registered_model: RegisteredModel | None = None
    resource: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def experiment_path(self) -> str | None:
        return self.submitted_experiment_path

    @property
    def run_progress(self) -> str:
        """The status, with a bar while training: `RUNNING ■■■□□□□□□□(30%)`."""
        if self.status is RunStatus.RUNNING and self.progress is not None:
            percent = int(self.progress.percent)
            filled = min(percent // (100 // _BAR), _BAR)
            return f"{self.status} {'■' * filled}{'□' * (_BAR - filled)}({percent}%)"
        return str(self.status)

    @property
    def formatted_events(self) -> str:
        """The events as the service's notebook table showed them, one per line."""
        return "<br>".join(f"<nobr>{html.escape(e.type)} {e.time}</nobr>" for e in self.events or [])

    def refresh(self) -> TrainingRun:
        """The run as the API server has it now."""
        from .runs import get

        return get(self, namespace=self.namespace)

    def cancel(self) -> int:
        """Cancel the run: 1 if it was cancelled, 0 if it had ended already."""
        from .runs import cancel

        return cancel(self, namespace=self.namespace)

    def get_events(self) -> ObjectList:
        """The run's events, oldest first."""
        from .runs import get_events

        return get_events(self)

    def _repr_html_(self) -> str:
        keys = ["name", "status", "run_progress", "details", "model", "task_type", "learning_rate",
                "training_duration", "train_data_path", "eval_data_path", "register_to",
                "submitted_experiment_path", "experiment_id", "run_id", "latest_checkpoint", "namespace"]
        rows = "".join(f"<tr><th>{' '.join(w.title() for w in key.split('_'))}</th>"
                       f"<td>{html.escape(_shown(getattr(self, key)))}</td></tr>" for key in keys)
        return f"<table border='1' class='dataframe'><tbody>{rows}</tbody></table>"


# --- from the resource --------------------------------------------------------------------------

def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _status(resource: Mapping[str, Any]) -> TrainingRunStatus:
    try:
        return TrainingRunStatus.model_validate(resource.get("status") or {})
    except ValidationError:  # written by a newer operator: show what still reads
        return TrainingRunStatus()


def run_status(resource: Mapping[str, Any]) -> RunStatus:
    meta = resource.get("metadata") or {}
    stopping = bool(meta.get("deletionTimestamp")) or (
        (meta.get("annotations") or {}).get(CANCEL_ANNOTATION) == "true")
    return status_from_phase((resource.get("status") or {}).get("phase"), stopping)


def events_of(resource: Mapping[str, Any]) -> ObjectList:
    events = [TrainingEvent(e.type.value, e.time, e.message) for e in _status(resource).events]
    return ObjectList(sorted(events, key=lambda e: e.time), EVENT_COLUMNS)


def _details(status: TrainingRunStatus, events: ObjectList) -> str:
    """Why the run is where it is: the failure, else the latest event."""
    failed = next((c for c in status.conditions if c.type == "Failed" and c.status == "True"), None)
    if failed is not None:
        return f"{failed.reason}: {failed.message}"
    return events[-1].message if events else ""


def _spec_fields(resource: Mapping[str, Any]) -> dict[str, Any]:
    """Spec values with kubetune's defaults filled in, read through the API models."""
    meta = resource.get("metadata") or {}
    try:
        run = parse_training_run(resource)
    except SpecError:  # the operator fails such a run (InvalidSpec); still show what was asked
        spec = resource.get("spec") or {}
        return {"model": spec.get("model"), "train_data_path": spec.get("trainDataPath"),
                "register_to": spec.get("registerTo"), "task_type": spec.get("taskType"),
                "eval_data_path": spec.get("evalDataPath"), "eval_prompts": spec.get("evalPrompts"),
                "custom_weights_path": spec.get("customWeightsPath"),
                "training_duration": spec.get("trainingDuration"), "learning_rate": spec.get("learningRate"),
                "context_length": spec.get("contextLength"),
                "submitted_experiment_path": spec.get("experimentPath"),
                "created_by": (meta.get("annotations") or {}).get(OWNER_ANNOTATION) or meta.get("namespace")}
    spec = run.spec
    return {"model": spec.model, "train_data_path": spec.train_data_path, "register_to": spec.register_to,
            "task_type": spec.task_type.value, "eval_data_path": spec.eval_data_path,
            "eval_prompts": list(spec.eval_prompts) or None, "custom_weights_path": spec.custom_weights_path,
            "training_duration": spec.training_duration, "learning_rate": spec.resolved_learning_rate(),
            "context_length": spec.resolved_context_length(),
            "submitted_experiment_path": run.experiment_path(), "created_by": run.owner,
            "submitted_config": spec}


def run_from_resource(resource: Mapping[str, Any], now: datetime | None = None) -> TrainingRun:
    """The SDK's view of a TrainingRun resource at `now` (which the ETA counts from)."""
    now = now or datetime.now(timezone.utc)
    meta = resource.get("metadata") or {}
    status = _status(resource)
    events = events_of(resource)
    run_state = run_status(resource)
    progress = status.progress
    eta = progress.eta_seconds if progress is not None else None
    end = now + timedelta(seconds=eta) if run_state is RunStatus.RUNNING and eta else None
    mlflow = status.mlflow
    return TrainingRun(
        name=meta.get("name", ""), status=run_state, **_spec_fields(resource),
        save_folder=posixpath.dirname(status.latest_checkpoint) if status.latest_checkpoint else None,
        details=_details(status, events),
        created_at=_time(meta.get("creationTimestamp")), started_at=status.start_time,
        estimated_end_time=end, formatted_eta=seconds_to_str(eta) if end else None,
        completed_at=status.completion_time, events=events,
        experiment_id=mlflow.experiment_id if mlflow else None, run_id=mlflow.run_id if mlflow else None,
        namespace=meta.get("namespace", "default"), phase=status.phase.value, progress=progress,
        latest_checkpoint=status.latest_checkpoint, registered_model=status.registered_model,
        resource=dict(resource))
