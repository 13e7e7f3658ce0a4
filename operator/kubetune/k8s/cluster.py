"""Thin, idempotent I/O against the API server: the `tick.Cluster` of the kopf shell.

A run's children are read from the informer's watch-fed copies, never listed per run. Every
write tolerates the race it can lose: a create that conflicts is done, a delete of something
gone is done. Objects travel as plain dicts, as the pure core expects them. Kubernetes Events
leave the tick: a few threads of their own post them (`EventPoster`), so a reconcile worker
spends its API round trips on the children and the status, and a burst of runs' Events waits
behind those writes instead of ahead of them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .. import metrics
from ..api import API_VERSION, KIND, PLURAL
from ..manifests import LABEL_RUN
from ..reconcile import ChildRef, PlannedEvent
from ..timestamps import timestamp
from .informer import KINDS, ChildStore
from .rest import MERGE_PATCH, Rest, collection, member

log = logging.getLogger("kubetune.k8s")
STORE_KIND = {"ConfigMap": "config_maps", "Service": "services", "Job": "jobs"}  # what a tick creates
CREATED_TTL = 30.0  # seconds a child we created stands in for the watch's copy, at most


class EventPoster:
    """Posts Kubernetes Events from `threads` daemon threads of its own, taken in the order they
    were handed over. At most `backlog` wait; more are dropped and counted (an Event is a
    courtesy, status.events is the record), and those still waiting when the operator leaves
    are let go."""

    def __init__(self, threads: int = 4, backlog: int = 10_000):
        self.threads = threads   # the API client's pool holds a connection for each
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue(backlog)
        for index in range(threads):
            threading.Thread(target=self._serve, daemon=True, name=f"events-{index}").start()

    def submit(self, post: Callable[[], None]) -> bool:
        """Queue `post`; False when the backlog is full and it was dropped."""
        try:
            self._queue.put_nowait(post)
        except queue.Full:
            metrics.EVENTS_DROPPED.inc()
            return False
        return True

    def join(self) -> None:
        """Wait until every queued Event was posted (or failed to be)."""
        self._queue.join()

    def _serve(self) -> None:
        while True:
            post = self._queue.get()
            try:
                post()
            finally:
                self._queue.task_done()


class Cluster:
    def __init__(self, store: ChildStore, api_client: client.ApiClient | None = None,
                 events: EventPoster | None = None):
        self.store = store
        self.rest = Rest(api_client or client.ApiClient())
        self.events = events or EventPoster()
        self._written: dict[str, dict[str, Any]] = {}  # uid -> the run as our last patch left it
        self._own_version: dict[str, str] = {}  # uid -> the resourceVersion our last patch made
        # (namespace, run) -> name -> (when, store kind, manifest): created, not yet watched
        self._created: dict[tuple[str, str], dict[str, tuple[float, str, Mapping[str, Any]]]] = {}
        self._created_lock = threading.Lock()

    def children(self, namespace: str, run: str) -> dict[str, list[dict[str, Any]]]:
        """The watch's copies, and what we created that the watch has not delivered yet (its
        manifest stands in): a tick right after ours must not create it again (409s cost the
        API server as much as the create, and under load the watch trails by seconds)."""
        found = self.store.children(namespace, run)
        with self._created_lock:
            pending = self._created.get((namespace, run))
            for name, (when, kind, manifest) in list((pending or {}).items()):
                seen = any(obj["metadata"]["name"] == name for obj in found[kind])
                if seen or time.monotonic() - when > CREATED_TTL:
                    del pending[name]
                else:
                    found[kind].append(dict(manifest))
            if pending == {}:
                del self._created[(namespace, run)]
        return found

    def newest(self, run: Mapping[str, Any]) -> Mapping[str, Any]:
        """kopf's watch-fed copy of a run, or the one our last status patch returned when the
        watch has not delivered that yet: deciding on a status older than our own write would
        emit its events twice."""
        uid = (run.get("metadata") or {}).get("uid", "")
        written = self._written.get(uid)
        if written is None or version(run) >= version(written):
            self._written.pop(uid, None)
            return run
        return written

    def watched(self, run: Mapping[str, Any]) -> bool:
        """The watch delivered this copy of a run: our last write's copy is kept no longer.
        True when it is the copy our last status patch made, its echo: the tick that wrote it
        decided on everything else it holds, and deciding again asks for nothing more."""
        meta = run.get("metadata") or {}
        self.newest(run)
        return bool(meta.get("resourceVersion")) and self._own_version.get(meta.get("uid", "")) == meta["resourceVersion"]

    def forget(self, uid: str) -> None:
        self._written.pop(uid, None)
        self._own_version.pop(uid, None)

    def create(self, manifest: Mapping[str, Any]) -> None:
        meta = manifest["metadata"]
        try:
            self._post(manifest)
        except ApiException as error:
            if error.status != 409:  # 409: it exists already, which is what we wanted
                raise
            return
        run = (meta.get("labels") or {}).get(LABEL_RUN)
        if run:
            with self._created_lock:
                self._created.setdefault((meta["namespace"], run), {})[meta["name"]] = (
                    time.monotonic(), STORE_KIND[manifest["kind"]], manifest)

    def _post(self, manifest: Mapping[str, Any]) -> None:
        api_version, plural = KINDS[STORE_KIND[manifest["kind"]]]
        self.rest.send("POST", collection(api_version, plural, manifest["metadata"]["namespace"]),
                       body=manifest)  # the reply is not read: nothing uses it

    def delete(self, ref: ChildRef) -> None:
        with self._created_lock:
            for pending in self._created.values():
                pending.pop(ref.name, None)
        try:  # plans delete only Jobs (children of a finished step or attempt)
            self.rest.send("DELETE", member(*KINDS["jobs"], ref.namespace, ref.name),
                           body={"propagationPolicy": ref.propagation})
        except ApiException as error:
            if error.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        with metrics.STATUS_PATCH_SECONDS.time():
            written = self.rest.json("PATCH", member(API_VERSION, PLURAL, namespace, name, "status"),
                                     body={"status": dict(status)}, content_type=MERGE_PATCH)
        written["metadata"].pop("managedFields", None)  # never read; more than half of it
        self._written[written["metadata"]["uid"]] = written
        self._own_version[written["metadata"]["uid"]] = written["metadata"]["resourceVersion"]

    def delete_run(self, namespace: str, name: str) -> None:
        try:
            self.rest.send("DELETE", member(API_VERSION, PLURAL, namespace, name))
        except ApiException as error:
            if error.status != 404:
                raise

    def post_event(self, run: Mapping[str, Any], event: PlannedEvent, now: datetime) -> None:
        """Mirror a typed run event as a Kubernetes Event on the TrainingRun, soon (queued)."""
        if event.mirrored:
            # Only what the Event names of the run: a backlog of thousands under load must not
            # hold as many old copies of runs' bodies.
            meta = {key: run["metadata"].get(key) for key in ("name", "namespace", "uid", "resourceVersion")}
            self.events.submit(lambda: self._post_event(meta, event, now))

    def _post_event(self, meta: Mapping[str, Any], event: PlannedEvent, now: datetime) -> None:
        try:
            self.rest.send("POST", collection("v1", "events", meta["namespace"]), body=event_body(meta, event, now))
        except Exception as error:  # noqa: BLE001 - an Event is a courtesy: log it, go on
            log.warning("could not post event %s: %s", event.type.value,
                        getattr(error, "reason", None) or error)


def event_body(meta: Mapping[str, Any], event: PlannedEvent, now: datetime) -> dict[str, Any]:
    """A core/v1 Event about the run `meta` names."""
    at = timestamp(now)
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid"),
                           "resourceVersion": meta.get("resourceVersion")},
        "reason": camel(event.type.value), "message": event.message[:1024], "type": event.k8s_type,
        "firstTimestamp": at, "lastTimestamp": at, "count": 1,
        "source": {"component": "kubetune-operator"},
        "reportingComponent": "kubetune.dev/operator", "reportingInstance": "kubetune-operator",
    }


def version(obj: Mapping[str, Any]) -> int:
    """An object's resourceVersion as a number: etcd's revision, which only grows."""
    text = (obj.get("metadata") or {}).get("resourceVersion") or "0"
    return int(text) if text.isdigit() else 0


def camel(name: str) -> str:
    """TRAIN_STARTED -> TrainStarted, the CamelCase Kubernetes Events use for reasons."""
    return "".join(part.capitalize() for part in name.split("_"))
