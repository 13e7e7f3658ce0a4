"""What `decide` asks a shell to do. Applying it in any order converges: every part is idempotent
(a create that conflicts is done, a delete of something gone is done), and the next `decide`
repairs whatever part did not land."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api import EventType

WARNING_EVENTS = frozenset({EventType.FAILED, EventType.RETRYING, EventType.CHECKPOINT_FALLBACK})
# Typed events whose Kubernetes Event would only repeat a sibling's, fired by the same status
# change: a spec is found valid by the first tick, the one that says Created, and Completed's
# message names the registered model and version. Each mirror is an API write; status.events
# keeps them all.
UNMIRRORED_EVENTS = frozenset({EventType.VALIDATED, EventType.REGISTERED})


@dataclass(frozen=True)
class ChildRef:
    """A child to delete. Foreground: the Job stays (terminating) until its pods are gone, so its
    name is not reused while they still run; Jobs must never be deleted with the default
    (orphan) propagation."""

    kind: str
    name: str
    namespace: str
    api_version: str = "batch/v1"
    propagation: str = "Foreground"


@dataclass(frozen=True)
class PlannedEvent:
    type: EventType
    message: str
    time: str  # RFC 3339, as in status.events

    @property
    def k8s_type(self) -> str:
        """The Kubernetes Event type of its mirror."""
        return "Warning" if self.type in WARNING_EVENTS else "Normal"

    @property
    def mirrored(self) -> bool:
        """Whether it goes out as a Kubernetes Event too."""
        return self.type not in UNMIRRORED_EVENTS


@dataclass(frozen=True)
class Plan:
    status: Mapping[str, Any] = field(default_factory=dict)  # merge patch of .status: changed keys
    create: tuple[Mapping[str, Any], ...] = ()  # manifests
    delete: tuple[ChildRef, ...] = ()
    events: tuple[PlannedEvent, ...] = ()  # already in status["events"]; mirror as k8s Events
    requeue_after: float | None = None  # seconds until the run wants looking at again
    delete_run: bool = False  # ttlSecondsAfterFinished has expired

    @property
    def empty(self) -> bool:
        """Nothing to change (a requeue is not a change)."""
        return not (self.status or self.create or self.delete or self.events or self.delete_run)
