"""A run's checkpoints, read from its status: each CHECKPOINT_SAVED event names the checkpoint
the run had saved then (`reconcile.status` writes "checkpoint saved: <latestCheckpoint>"), and
`latestCheckpoint` the newest. Pure; a test ties the message format to the operator's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api import EventType

SAVED_PREFIX = "checkpoint saved: "


def checkpoints_of(resource: Mapping[str, Any]) -> list[str]:
    """Checkpoint paths, oldest first, each once."""
    status = resource.get("status") or {}
    paths = [event.get("message", "")[len(SAVED_PREFIX):].strip()
             for event in status.get("events") or []
             if event.get("type") == EventType.CHECKPOINT_SAVED.value
             and event.get("message", "").startswith(SAVED_PREFIX)]
    if status.get("latestCheckpoint"):
        paths.append(status["latestCheckpoint"])
    return list(dict.fromkeys(p for p in paths if p))
