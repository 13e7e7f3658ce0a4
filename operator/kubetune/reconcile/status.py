"""Status bookkeeping: Kubernetes-shaped conditions, and typed events derived from status changes.

Events are not remembered anywhere: each one is the visible edge of a status change that one
`decide` call writes (a condition turning True, `attempts` growing, the phase ending), so the
call that writes the change is the only one that emits it, however often `decide` runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..api import EventType, Phase
from ..timestamps import parse_time, timestamp  # noqa: F401 (decide takes them from here)
from .plan import PlannedEvent

VALIDATED = "Validated"
DATA_PREPARED = "DataPrepared"
TRAINED = "Trained"
REGISTERED = "Registered"
RUNNING = "Running"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
CONDITION_TYPES = (VALIDATED, DATA_PREPARED, TRAINED, REGISTERED, RUNNING, SUSPENDED, SUCCEEDED,
                   FAILED)


@dataclass(frozen=True)
class Want:
    """A condition's wanted status; `lastTransitionTime` is filled in by `merge_conditions`."""

    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""


def condition_status(status: Mapping[str, Any], type_: str) -> str | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == type_:
            return condition.get("status")
    return None


def is_true(status: Mapping[str, Any], type_: str) -> bool:
    return condition_status(status, type_) == "True"


def merge_conditions(old: Sequence[Mapping[str, Any]], wanted: Mapping[str, Want],
                     generation: int | None, now: datetime) -> list[dict[str, Any]]:
    """The conditions in a fixed order; a transition time moves only when the status does."""
    previous = {c.get("type"): c for c in old}
    merged = []
    for type_ in CONDITION_TYPES:
        want, before = wanted[type_], previous.get(type_)
        unchanged = before is not None and before.get("status") == want.status
        condition = {"type": type_, "status": want.status, "reason": want.reason,
                     "message": want.message,
                     "lastTransitionTime": before.get("lastTransitionTime") if unchanged
                     else timestamp(now)}
        if generation is not None:
            condition["observedGeneration"] = generation
        merged.append(condition)
    return merged


def _percent(status: Mapping[str, Any]) -> float:
    return float((status.get("progress") or {}).get("percent") or 0.0)


def _became_true(old: Mapping[str, Any], new: Mapping[str, Any], type_: str) -> bool:
    return is_true(new, type_) and not is_true(old, type_)


def _default_message(type_: EventType, new: Mapping[str, Any]) -> str:
    attempts = new.get("attempts") or 0
    percent = _percent(new)
    model = new.get("registeredModel") or {}
    resume = new.get("resume") or {}
    return {
        EventType.CREATED: "TrainingRun created",
        EventType.VALIDATED: "the spec is valid",
        EventType.DATA_VALIDATED: "training data prepared",
        EventType.TRAIN_STARTED: "training started",
        EventType.TRAIN_UPDATED: f"training {percent:.0f}% done",
        EventType.CHECKPOINT_SAVED: f"checkpoint saved: {new.get('latestCheckpoint')}",
        EventType.TRAIN_FINISHED: "training finished",
        EventType.RETRYING: f"restarting all ranks, attempt {attempts}",
        EventType.RESUMED_FROM_CHECKPOINT: f"attempt {resume.get('attempt')} resumed from {resume.get('checkpoint')}",
        EventType.CHECKPOINT_FALLBACK: f"attempt {resume.get('attempt')}: {resume.get('note')}",
        EventType.REGISTERED: f"registered {model.get('name')} version {model.get('version')}",
        EventType.COMPLETED: "run completed",
        EventType.FAILED: "run failed",
        EventType.STOPPED: "run cancelled",
    }[type_]


def _fired(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[EventType]:
    """Which events this status change is the edge of, in the order they happened."""
    old_attempts, new_attempts = old.get("attempts") or 0, new.get("attempts") or 0
    phase_changed = old.get("phase") != new.get("phase")
    # `resume` names its attempt: each attempt's resume is a change once, however often it is seen.
    resumed = bool(new.get("resume")) and new.get("resume") != old.get("resume")
    fell_back = resumed and bool(new["resume"].get("note"))
    checks = [
        (EventType.CREATED, not old.get("phase")),
        (EventType.VALIDATED, _became_true(old, new, VALIDATED)),
        (EventType.DATA_VALIDATED, _became_true(old, new, DATA_PREPARED)),
        (EventType.TRAIN_STARTED, old_attempts == 0 and new_attempts >= 1),
        (EventType.RETRYING, old_attempts >= 1 and new_attempts > old_attempts),
        (EventType.RESUMED_FROM_CHECKPOINT, resumed and not fell_back),
        (EventType.CHECKPOINT_FALLBACK, fell_back),
        (EventType.TRAIN_UPDATED, not is_true(new, TRAINED)
         and int(_percent(new) // 10) > int(_percent(old) // 10)),
        (EventType.CHECKPOINT_SAVED, bool(new.get("latestCheckpoint"))
         and new.get("latestCheckpoint") != old.get("latestCheckpoint")),
        (EventType.TRAIN_FINISHED, _became_true(old, new, TRAINED)),
        (EventType.REGISTERED, _became_true(old, new, REGISTERED)),
        (EventType.COMPLETED, phase_changed and new.get("phase") == Phase.SUCCEEDED.value),
        (EventType.FAILED, phase_changed and new.get("phase") == Phase.FAILED.value),
        (EventType.STOPPED, phase_changed and new.get("phase") == Phase.CANCELLED.value),
    ]
    return [type_ for type_, fired in checks if fired]


def derive_events(old: Mapping[str, Any], new: Mapping[str, Any],
                  notes: Mapping[EventType, str], now: datetime) -> list[PlannedEvent]:
    """`notes` give a message with more detail than the status holds (why a retry happened)."""
    return [PlannedEvent(type_, notes.get(type_) or _default_message(type_, new), timestamp(now))
            for type_ in _fired(old, new)]


def event_entries(old: Sequence[Mapping[str, Any]], new: Sequence[PlannedEvent],
                  cap: int) -> list[dict[str, Any]]:
    entries = [dict(e) for e in old] + [
        {"type": e.type.value, "time": e.time, "message": e.message} for e in new]
    return entries[-cap:]
