"""kopf handlers: one long-lived reconcile loop per TrainingRun, woken by changes, not a clock.

Each run's loop (a kopf daemon) reconciles when the run or one of its children changes: kopf's
watch keeps the run's body fresh and pokes the loop; the informer's watches do the same for
Jobs, Pods, ConfigMaps and Services. A quiet run costs no API request: its children are read
from the watch-fed copies, and the status is patched only when `decide` changes it. The loop
also wakes when the plan asks to be looked at again (a deadline, a TTL, the next progress
read) and at the latest every resync interval, in case a cue was lost. Still level-triggered:
each tick recomputes the whole status from what exists. On deletion, owner references let the
garbage collector remove every child; the run's files go first (`kubetune.deletion`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from datetime import datetime, timezone
from typing import Any

import kopf

from .. import metrics
from ..api import GROUP, PLURAL, VERSION, Phase
from ..deletion import delete_storage
from ..settings import OperatorSettings
from ..tick import ProgressReader, reconcile
from .cluster import Cluster

log = logging.getLogger("kubetune.handlers")
ALL_PHASES = [phase.value for phase in Phase]
ERROR_BACKOFF = 5.0  # seconds before a tick that raised is tried again


class Wakeups:
    """An asyncio event per run, set from any thread when something of that run changed."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        self._poked_at: dict[tuple[str, str], float] = {}  # the first poke not yet taken
        self.loop: asyncio.AbstractEventLoop | None = None

    def event(self, namespace: str, name: str) -> asyncio.Event:
        return self._events.setdefault((namespace, name), asyncio.Event())

    def poke_from_thread(self, namespace: str, name: str) -> None:
        """What the informer's threads call."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.poke, namespace, name, time.monotonic())

    def poke(self, namespace: str, name: str, at: float | None = None) -> None:
        event = self._events.get((namespace, name))
        if event is not None:
            event.set()
            self._poked_at.setdefault((namespace, name), time.monotonic() if at is None else at)

    def take(self, namespace: str, name: str) -> float | None:
        """When the run was first poked since the last take (None: not poked, e.g. a timer)."""
        return self._poked_at.pop((namespace, name), None)

    def forget(self, namespace: str, name: str) -> None:
        self._events.pop((namespace, name), None)
        self._poked_at.pop((namespace, name), None)


async def sleep_until_woken(wake: asyncio.Event, timeout: float) -> bool:
    """False when the time ran out first."""
    try:
        await asyncio.wait_for(wake.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


def tick(cluster: Cluster, run: dict[str, Any], settings: OperatorSettings,
         progress: ProgressReader, poked_at: float | None = None,
         side: Executor | None = None) -> float | None:
    """One reconcile; the seconds until the run wants looking at again (None: no wish).
    `side`: the threads its status patch goes out on (`tick.apply`)."""
    meta = run["metadata"]
    started = time.monotonic()
    if poked_at is not None:  # a change's wait for its reconcile: the event loop, then a free thread
        metrics.RECONCILE_WAIT_SECONDS.observe(started - poked_at)
    try:
        children = cluster.children(meta["namespace"], meta["name"])
        plan = reconcile(cluster, run, children, settings, progress, datetime.now(timezone.utc), side)
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
    phase = plan.status.get("phase") or (run.get("status") or {}).get("phase") or "Pending"
    metrics.record_phase(meta["namespace"], meta["name"], phase, ALL_PHASES)
    metrics.record_gpus(meta["namespace"], meta["name"], phase, run.get("spec") or {})
    return plan.requeue_after


def register(settings: OperatorSettings, resync: float) -> None:
    """Install the handlers into kopf's default registry. `memo` holds `cluster` (a Cluster),
    `wakeups` (Wakeups), `progress` (ProgressReader), `synced` (an asyncio.Event: the informer
    has listed every kind once) and three thread pools, `executor` (the ticks of a change),
    `resyncs` (the ticks of a run's timer) and `side` (status patches, beside a tick's other
    writes). A change never queues behind the timers (200 training runs have a progress read
    due every 150 ms, a burst of them after a restart)."""

    @kopf.daemon(GROUP, VERSION, PLURAL, initial_delay=0.0, cancellation_timeout=1.0)
    async def reconcile_run(namespace: str, name: str, uid: str, body: kopf.Body,
                            memo: kopf.Memo, **_: Any) -> None:
        wake = memo.wakeups.event(namespace, name)
        try:
            await memo.synced.wait()  # the children's copies are complete
            loop = asyncio.get_running_loop()
            woken = True  # the first tick is news too
            while True:
                wake.clear()  # before reading: a change from now on wakes the next tick
                poked_at = memo.wakeups.take(namespace, name)
                run = memo.cluster.newest(dict(body))
                if run["metadata"].get("deletionTimestamp"):
                    return  # the garbage collector takes the children
                pool = memo.executor if woken else memo.resyncs
                try:
                    wanted = await loop.run_in_executor(pool, tick, memo.cluster, run, settings,
                                                        memo.progress, poked_at, memo.side)
                except Exception as error:  # counted and logged; tried again soon
                    metrics.RECONCILE_ERRORS.labels(type(error).__name__).inc()
                    log.warning("reconcile %s/%s failed: %s", namespace, name, error)
                    wanted = ERROR_BACKOFF
                woken = await sleep_until_woken(wake, min(resync, wanted) if wanted else resync)
        finally:
            # The loop stops with its object (deleted, or the operator leaving).
            memo.wakeups.forget(namespace, name)
            memo.cluster.forget(uid)
            memo.progress.forget(uid)

    @kopf.on.delete(GROUP, VERSION, PLURAL)
    async def remove_storage(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        """A deleted run's files outlive it: stop its steps, remove them, then let it go."""
        loop = asyncio.get_running_loop()
        plan = await loop.run_in_executor(memo.executor, delete_storage, memo.cluster, dict(body), settings)
        if not plan.done:
            raise kopf.TemporaryError(plan.note, delay=2)

    @kopf.on.event(GROUP, VERSION, PLURAL)
    async def run_changed(type: str, event: dict[str, Any], namespace: str, name: str, memo: kopf.Memo,
                          **_: Any) -> None:
        # kopf keeps the newest copy of each run (this event's object) for its daemon; its
        # managed fields, never read, are more than half of it (~17 KB a run in memory).
        event["object"].get("metadata", {}).pop("managedFields", None)
        if type == "DELETED":  # the loop stops with its object: drop its metrics here
            metrics.forget_run(namespace, name, ALL_PHASES)
        elif not memo.cluster.watched(event["object"]):  # each status patch's echo: no news
            memo.wakeups.poke(namespace, name)
