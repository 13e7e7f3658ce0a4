"""Watch-fed copies of every run's children: a list and a watch per kind, no request per run.

Jobs, Pods, ConfigMaps and Services carrying the `kubetune.dev/run` label are listed once
(server-side label selection), then watched from that version. Any failure (an expired
version, an API server restart) lists again and replaces that kind's copy whole, so a deletion
missed meanwhile is not kept. Every change calls `on_change(namespace, run)`: the shell's cue
to reconcile that run. Objects are kept as the plain JSON dicts the pure core expects.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes import client
from kubernetes.watch.watch import iter_resp_lines

from ..manifests import LABEL_RUN
from .rest import Rest, collection

log = logging.getLogger("kubetune.informer")
Key = tuple[str, str]  # (namespace, run name)
KINDS: dict[str, tuple[str, str]] = {  # the store's name of a kind -> (apiVersion, plural)
    "jobs": ("batch/v1", "jobs"),
    "pods": ("v1", "pods"),
    "config_maps": ("v1", "configmaps"),
    "services": ("v1", "services"),
}
SELECTOR = ("labelSelector", LABEL_RUN)  # every child carries the run label


def run_key(obj: dict[str, Any]) -> Key | None:
    meta = obj.get("metadata") or {}
    run = (meta.get("labels") or {}).get(LABEL_RUN)
    return (meta.get("namespace", ""), run) if run else None


# What `observe` reads of a pod's and a Job's status; the rest changes without news for it (a
# pod's start time and host IPs, the Job controller's counts of ready and terminating pods).
POD_STATUS_READ = ("phase", "reason", "message", "podIP", "containerStatuses", "initContainerStatuses")
CONTAINER_STATUS_READ = ("name", "state")  # not its image, mounts, resources, readiness, restarts
JOB_STATUS_READ = ("active", "succeeded", "failed", "conditions")
JOB_SPEC_READ = ("suspend", "completions")


def slim(kind: str, obj: dict[str, Any]) -> None:
    """Drop what the reconcile never reads and most of the bytes are: managed fields, owner
    references and finalizers, a pod's spec and most of its status, most of a Job's spec and
    status, all of a Service but its metadata (`observe` reads metadata, a pod's
    phase and its containers' states, a Job's status counts and conditions, suspend and completions,
    that a Service exists). A thousand runs' children then take ~30 MB."""
    meta = obj.get("metadata") or {}
    for unread in ("managedFields", "ownerReferences", "finalizers"):
        meta.pop(unread, None)
    if kind == "pods":
        obj.pop("spec", None)
        keep(obj, "status", POD_STATUS_READ)
        for containers in ("containerStatuses", "initContainerStatuses"):
            for index, container in enumerate((obj.get("status") or {}).get(containers) or []):
                obj["status"][containers][index] = {key: container[key] for key in CONTAINER_STATUS_READ
                                                    if key in container}
    elif kind == "jobs":
        keep(obj, "spec", JOB_SPEC_READ)
        keep(obj, "status", JOB_STATUS_READ)
    elif kind == "services":
        obj.pop("spec", None)
        obj.pop("status", None)


def keep(obj: dict[str, Any], part: str, read: tuple[str, ...]) -> None:
    if obj.get(part):
        obj[part] = {key: obj[part][key] for key in read if key in obj[part]}


def same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Equal but for the resourceVersion, which every write moves."""
    return ({**old, "metadata": {**old["metadata"], "resourceVersion": ""}}
            == {**new, "metadata": {**new["metadata"], "resourceVersion": ""}})


class ChildStore:
    """What the watches delivered, by run: kind -> (namespace, run) -> name -> object."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_run: dict[str, dict[Key, dict[str, dict[str, Any]]]] = {kind: {} for kind in KINDS}

    def children(self, namespace: str, run: str) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            return {kind: list(runs.get((namespace, run), {}).values())
                    for kind, runs in self._by_run.items()}

    def put(self, kind: str, obj: dict[str, Any]) -> Key | None:
        """The run `obj` is a child of; None when it is none's, or when what the reconcile reads
        of it did not change (a finalizer, a binding, a count of ready pods): no news."""
        key = run_key(obj)
        if key is None:
            return None
        slim(kind, obj)
        with self._lock:
            named = self._by_run[kind].setdefault(key, {})
            old = named.get(obj["metadata"]["name"])
            named[obj["metadata"]["name"]] = obj
        return None if old is not None and same(old, obj) else key

    def remove(self, kind: str, obj: dict[str, Any]) -> Key | None:
        key = run_key(obj)
        with self._lock:
            named = self._by_run[kind].get(key) if key else None
            if named is not None:
                named.pop(obj["metadata"]["name"], None)
                if not named:
                    del self._by_run[kind][key]
        return key

    def replace(self, kind: str, namespace: str | None, objects: Iterable[dict[str, Any]]) -> set[Key]:
        """A fresh list of one kind (in one namespace, or all): the runs whose children changed."""
        with self._lock:
            old = {key: named for key, named in self._by_run[kind].items()
                   if namespace is None or key[0] == namespace}
            for key in old:
                del self._by_run[kind][key]
        for obj in objects:
            self.put(kind, obj)
        with self._lock:
            new = {key: named for key, named in self._by_run[kind].items()
                   if namespace is None or key[0] == namespace}
        return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


class ChildInformer:
    """One thread per kind (and watched namespace) keeps `store` in step with the API server."""

    def __init__(self, api_client: client.ApiClient, namespaces: tuple[str, ...],
                 on_change: Callable[[str, str], None], watch_timeout: int = 300):
        self.rest, self.on_change, self.watch_timeout = Rest(api_client), on_change, watch_timeout
        self.scopes: list[str | None] = list(namespaces) or [None]  # None: cluster-wide
        self.store = ChildStore()
        self.stopping = threading.Event()
        self._listed: set[tuple[str, str | None]] = set()
        self.synced = threading.Event()  # every kind listed once: the copies can be trusted

    def start(self) -> ChildInformer:
        for kind in KINDS:
            for scope in self.scopes:
                threading.Thread(target=self._run, args=(kind, scope), daemon=True,
                                 name=f"informer-{kind}-{scope or 'all'}").start()
        return self

    def stop(self) -> None:
        self.stopping.set()

    def _run(self, kind: str, namespace: str | None) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                listed = json.loads(self.rest.send("GET", collection(*KINDS[kind], namespace),
                                                   query=[SELECTOR], timeout=30))
                self._changed(self.store.replace(kind, namespace, listed["items"]))
                self._mark_listed(kind, namespace)
                version, backoff = listed["metadata"]["resourceVersion"], 0.5
                while not self.stopping.is_set():
                    version = self._watch(kind, namespace, version)
            except Exception as error:  # noqa: BLE001 - any failure means: list again
                if not self.stopping.is_set():
                    log.info("%s watch restarts after %s: %s", kind, type(error).__name__, error)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)

    def _watch(self, kind: str, namespace: str | None, version: str) -> str:
        query = [SELECTOR, ("watch", "true"), ("resourceVersion", version), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", str(self.watch_timeout))]
        response = self.rest.request("GET", collection(*KINDS[kind], namespace), query=query,
                                     timeout=(10, self.watch_timeout + 30))
        try:
            for line in iter_resp_lines(response):
                event = json.loads(line)
                if event["type"] == "ERROR":  # 410: the version expired; list again
                    raise RuntimeError(f"watch error: {event['object'].get('message')}")
                obj = event["object"]
                version = obj["metadata"]["resourceVersion"]
                if event["type"] == "BOOKMARK":
                    continue
                store = self.store.remove if event["type"] == "DELETED" else self.store.put
                self._changed({store(kind, obj)} - {None})
                if self.stopping.is_set():
                    break
        finally:
            response.release_conn()
        return version

    def _changed(self, keys: set[Key]) -> None:
        for namespace, run in keys:
            self.on_change(namespace, run)

    def _mark_listed(self, kind: str, namespace: str | None) -> None:
        self._listed.add((kind, namespace))
        if len(self._listed) == len(KINDS) * len(self.scopes):
            self.synced.set()
