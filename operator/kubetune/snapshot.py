"""The run's snapshot: what a running run uses, frozen when it starts (the config ConfigMap).

Two documents, written once into the immutable ConfigMap `<run>-config`:

- `config.json`: the resolved `RunConfig` every step reads (`--config`);
- `run.json`: `{"version": SNAPSHOT_VERSION, "spec": ...}`, the spec as it was then. Every
  child of the run is built from it, so an edit of `resources` (GPUs, CPU, memory, ...) or of
  anything else mid-run never gives the next attempt pods that disagree with its torchrun.

Only the controls act live: `LIVE_FIELDS` are read from the run as it is now. A snapshot that
cannot be read (another operator version wrote it, or someone replaced it) fails the run with
`SnapshotUnreadable`: rebuilding it from today's spec would be the very drift it exists to stop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.config import RunConfig
from pydantic import ValidationError

SNAPSHOT_VERSION = 1
CONFIG_KEY = "config.json"
SPEC_KEY = "run.json"
# Controls of a running run: stopping it, how long and how often it may try, when it is removed.
LIVE_FIELDS = ("suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished")
UNREADABLE = "SnapshotUnreadable"


class SnapshotUnreadable(ValueError):
    """The snapshot ConfigMap exists but cannot be used; the message says why."""


@dataclass(frozen=True)
class Snapshot:
    config: RunConfig
    spec: Mapping[str, Any]  # the spec at the start, as the API returns it (camelCase)

    def frozen_spec(self, live: Mapping[str, Any]) -> dict[str, Any]:
        """The spec a running run acts on: the snapshot's, with the controls as they are now."""
        spec = {key: value for key, value in self.spec.items() if key not in LIVE_FIELDS}
        return {**spec, **{key: live[key] for key in LIVE_FIELDS if key in live}}


def snapshot_data(config: RunConfig, spec: Mapping[str, Any]) -> dict[str, str]:
    """The ConfigMap's data for a run starting now."""
    return {CONFIG_KEY: config.model_dump_json(indent=2),
            SPEC_KEY: json.dumps({"version": SNAPSHOT_VERSION, "spec": dict(spec)}, indent=2)}


def read_snapshot(name: str, data: Mapping[str, str]) -> Snapshot:
    """The snapshot in ConfigMap `name`'s data; SnapshotUnreadable saying what is wrong."""
    missing = [key for key in (CONFIG_KEY, SPEC_KEY) if not data.get(key)]
    if missing:
        raise SnapshotUnreadable(f"ConfigMap {name} has no {' or '.join(missing)}: it was not "
                                 "written by this operator version; delete the run and create it again")
    try:
        document = json.loads(data[SPEC_KEY])
        version = document.get("version") if isinstance(document, dict) else None
        if version != SNAPSHOT_VERSION:
            raise SnapshotUnreadable(f"ConfigMap {name}: {SPEC_KEY} has version {version!r}, this "
                                     f"operator reads version {SNAPSHOT_VERSION}; run it with the "
                                     "operator version that started it, or create the run again")
        spec = document.get("spec")
        if not isinstance(spec, dict):
            raise SnapshotUnreadable(f"ConfigMap {name}: {SPEC_KEY} holds no spec object")
        return Snapshot(RunConfig.model_validate_json(data[CONFIG_KEY]), spec)
    except ValueError as error:  # JSON or pydantic (ValidationError is a ValueError)
        if isinstance(error, SnapshotUnreadable):
            raise
        detail = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
        raise SnapshotUnreadable(f"ConfigMap {name} cannot be read ({detail}); delete the run "
                                 "and create it again") from None
