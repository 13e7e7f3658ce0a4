"""kopf handlers: one level-triggered reconcile per TrainingRun, on a timer.

A timer (one task per object, never concurrent with itself) reads the run fresh from the API,
lists its children by label, scrapes rank 0's progress, calls the pure `decide` and applies the
plan. No edge is trusted: a missed watch event or an operator restart changes nothing, the next
tick sees the same world. Deletion needs no handler: owner references let the garbage collector
remove every child.

A finished run whose last look found nothing left to stop costs no API call per tick until it
changes (`QuietRuns`): only its TTL clock runs, on kopf's cached copy of the object.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from datetime import datetime, timezone
from typing import Any, Mapping

import kopf

from .. import metrics
from ..api import GROUP, PLURAL, TERMINAL, VERSION, Phase
from ..reconcile import Observed, Plan, decide, observe, parse_metrics, progress_url
from ..settings import OperatorSettings
from .cluster import Cluster

log = logging.getLogger("kubetune.handlers")
ALL_PHASES = [phase.value for phase in Phase]


def scrape(url: str | None, timeout: float = 2.0) -> dict[str, Any] | None:
    """Rank 0's progress; a trainer that is starting up or gone just means no news."""
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (pod IP)
            return parse_metrics(response.read().decode())
    except OSError:
        return None


def observe_run(cluster: Cluster, namespace: str, name: str, settings: OperatorSettings,
                finished: bool) -> Observed:
    children = cluster.children(namespace, name)
    observed = observe(**children)
    # A finished run is still observed (leftover children get cleaned up) but not scraped.
    progress = None if finished else scrape(progress_url(observed, settings))
    return observe(**children, progress=progress) if progress else observed


def apply(cluster: Cluster, run: dict[str, Any], plan: Plan, now: datetime) -> None:
    meta = run["metadata"]
    for ref in plan.delete:
        cluster.delete(ref)
    for manifest in plan.create:
        cluster.create(manifest)
    if plan.status:
        cluster.patch_status(meta["namespace"], meta["name"], plan.status)
    for event in plan.events:  # after the status: status.events is the record, these mirror it
        cluster.post_event(run, event, now)
    if plan.delete_run:
        cluster.delete_run(meta["namespace"], meta["name"])


class QuietRuns:
    """Finished runs (uid -> resourceVersion) whose last fresh look found nothing left to stop."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def holds(self, body: Mapping[str, Any]) -> bool:
        meta = body.get("metadata") or {}
        return bool(meta.get("uid")) and self._seen.get(meta["uid"]) == meta.get("resourceVersion")

    def mark(self, body: Mapping[str, Any]) -> None:
        self._seen[body["metadata"]["uid"]] = body["metadata"]["resourceVersion"]

    def forget(self, uid: str | None) -> None:
        self._seen.pop(uid or "", None)


def is_finished(run: Mapping[str, Any]) -> bool:
    return (run.get("status") or {}).get("phase") in {p.value for p in TERMINAL}


def reconcile(cluster: Cluster, namespace: str, name: str, settings: OperatorSettings,
              quiet: QuietRuns | None = None, cached: Mapping[str, Any] | None = None) -> Plan | None:
    """One tick. `cached` is kopf's copy of the run: used as is only for a quiet finished run."""
    now = datetime.now(timezone.utc)
    if quiet is not None and cached is not None and is_finished(cached) and quiet.holds(cached):
        plan = decide(cached, Observed(), now, settings)  # nothing is left: only the TTL can act
        apply(cluster, cached, plan, now)
        return plan
    run = cluster.get_run(namespace, name)
    if run is None or run["metadata"].get("deletionTimestamp"):
        metrics.forget_run(namespace, name, ALL_PHASES)
        return None
    phase, finished = (run.get("status") or {}).get("phase"), is_finished(run)
    observed = observe_run(cluster, namespace, name, settings, finished)
    plan = decide(run, observed, now, settings)
    apply(cluster, run, plan, now)
    metrics.record_phase(namespace, name, plan.status.get("phase", phase) or "Pending", ALL_PHASES)
    if quiet is not None and finished and not plan.delete and not plan.status:
        quiet.mark(run)
    return plan


def register(settings: OperatorSettings, interval: float) -> None:
    """Install the handlers into kopf's default registry."""

    @kopf.timer(GROUP, VERSION, PLURAL, interval=interval, initial_delay=0.1)
    def reconcile_timer(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        started = time.monotonic()
        try:
            reconcile(memo.cluster, namespace, name, settings, memo.quiet, dict(body))
        except Exception as error:  # counted and logged; the next tick retries (bounded by interval)
            metrics.RECONCILE_ERRORS.labels(type(error).__name__).inc()
            log.warning("reconcile %s/%s failed: %s", namespace, name, error)
            raise kopf.TemporaryError(str(error), delay=interval) from error
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    @kopf.on.event(GROUP, VERSION, PLURAL, when=lambda type, **_: type == "DELETED")
    def forget_deleted(namespace: str, name: str, uid: str | None, memo: kopf.Memo, **_: Any) -> None:
        # The timer stops with its object, so no reconcile sees a run gone: drop its metrics here.
        metrics.forget_run(namespace, name, ALL_PHASES)
        memo.quiet.forget(uid)
