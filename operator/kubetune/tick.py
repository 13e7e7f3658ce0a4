"""One reconcile of one run, the same for both shells: what exists → `decide` → apply the plan.

The kopf shell (`k8s`) and local mode (`local`) differ only in their `Cluster`: where a run's
children come from (watch-fed copies of API objects, or local processes shown in the API's
shape) and where the plan's writes go. Everything between is here, once.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, wait
from datetime import datetime
from typing import Any, Protocol

from .api import TERMINAL
from .reconcile import ChildRef, Plan, PlannedEvent, decide, observe, parse_metrics, progress_url
from .settings import OperatorSettings

Children = Mapping[str, list[dict[str, Any]]]  # "jobs", "pods", "config_maps", "services"


class Cluster(Protocol):
    """Where a run's children are and where a plan's writes go. Every write is idempotent."""

    def children(self, namespace: str, run: str) -> Children: ...

    def create(self, manifest: Mapping[str, Any]) -> None: ...

    def delete(self, ref: ChildRef) -> None: ...

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    def delete_run(self, namespace: str, name: str) -> None: ...

    def post_event(self, run: Mapping[str, Any], event: PlannedEvent, now: datetime) -> None: ...


def scrape(url: str | None, timeout: float = 2.0) -> dict[str, Any] | None:
    """Rank 0's progress; a trainer that is starting up or gone just means no news."""
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (pod IP)
            return parse_metrics(response.read().decode())
    except OSError:
        return None


class ProgressReader:
    """Rank 0's progress, read at most once per `interval` per run, and only while it trains.

    Between reads the last report stands, so a reconcile that a child's change triggered
    neither scrapes again nor loses the progress it already wrote."""

    def __init__(self, interval: float, read=scrape):
        self.interval, self.read = interval, read
        self._last: dict[str, tuple[float, dict[str, Any] | None]] = {}  # uid -> (when, report)

    def progress(self, uid: str, url: str | None) -> dict[str, Any] | None:
        if url is None:
            self._last.pop(uid, None)
            return None
        now = time.monotonic()
        when, report = self._last.get(uid, (float("-inf"), None))
        if now - when >= self.interval:
            report = self.read(url) or report
            self._last[uid] = (now, report)
        return report

    def forget(self, uid: str) -> None:
        self._last.pop(uid, None)


def reconcile(cluster: Cluster, run: Mapping[str, Any], children: Children,
              settings: OperatorSettings, progress: ProgressReader, now: datetime,
              side: Executor | None = None) -> Plan:
    """One tick of `run` (the resource as the API returns it) given its `children`; `side`: see
    `apply`."""
    observed = observe(**children)
    # A finished run is still observed (leftover children get cleaned up) but not scraped.
    finished = (run.get("status") or {}).get("phase") in {phase.value for phase in TERMINAL}
    url = None if finished else progress_url(observed, settings)
    uid = (run.get("metadata") or {}).get("uid", "")
    report = progress.progress(uid, url)
    if report:
        observed = observe(**children, progress=report)
    plan = decide(run, observed, now, settings)
    if "attempts" in plan.status:  # a new attempt: the last one's report must not stand for it
        progress.forget(uid)
    apply(cluster, run, plan, now, side)
    return plan


def apply(cluster: Cluster, run: Mapping[str, Any], plan: Plan, now: datetime,
          side: Executor | None = None) -> None:
    """Given `side` (threads that only ever run one write), the status patch goes out on it
    while the children's writes go out here: each is on a critical path of its own (a step's
    Job after the last step's exit; the status showing that exit), and neither waits for the
    other's round trips. Children made together go out together too, ConfigMaps first (the
    pods mount them). Everything is done when this returns."""
    meta = run["metadata"]
    patched = None
    if plan.status and side is not None:
        patched = side.submit(cluster.patch_status, meta["namespace"], meta["name"], plan.status)
    try:
        for ref in plan.delete:
            cluster.delete(ref)
        create_children(cluster, plan.create, side)
    finally:
        if patched is not None:  # never return with our own write in flight
            wait([patched])
    if patched is not None:
        patched.result()  # its error, after the children's
    elif plan.status:
        cluster.patch_status(meta["namespace"], meta["name"], plan.status)
    for event in plan.events:  # after the status: status.events is the record, these mirror it
        cluster.post_event(run, event, now)
    if plan.delete_run:
        cluster.delete_run(meta["namespace"], meta["name"])


def create_children(cluster: Cluster, manifests: Sequence[Mapping[str, Any]], side: Executor | None) -> None:
    """ConfigMaps one by one, then the rest at once on `side` (here, one by one, without it);
    the first error is raised once every create has ended."""
    first = [m for m in manifests if m["kind"] == "ConfigMap"]
    rest = [m for m in manifests if m["kind"] != "ConfigMap"]
    for manifest in first:
        cluster.create(manifest)
    if side is None or len(rest) < 2:
        for manifest in rest:
            cluster.create(manifest)
        return
    created = [side.submit(cluster.create, manifest) for manifest in rest[1:]]
    try:
        cluster.create(rest[0])
    finally:
        wait(created)
    for future in created:
        future.result()
