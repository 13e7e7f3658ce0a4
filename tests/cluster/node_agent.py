"""A small node agent that plays kubelet and scheduler for the e2e tests.

It registers the Node `kt-node-0` (and keeps its Lease renewed), binds unscheduled pods to it when
their nodeSelector fits, and runs each container of its pods as a local process group: init
containers one after another, then the app containers side by side, with the pod's environment.
Pod status is reported back as a kubelet would (phase, conditions, podIP, container states,
exit codes, termination messages), and deleting a pod stops its processes (SIGTERM, SIGKILL
after the grace period) before the pod is removed with grace 0.

Stand-ins, because there is no container runtime:
- Mounts: volumes are folders under `<root>/pods/<ns>_<pod>_<uid>/volumes/` (configMap, secret,
  downwardAPI, projected and emptyDir are materialized; a persistentVolumeClaim is
  `<root>/pvc/<ns>/<claim>`, shared by the pods using it). A process sees the host folder, so
  the agent rewrites each volumeMount's mountPath (at a path boundary, with subPath) inside the
  container's command, args, env values and workingDir. Paths that code hard-wires without
  passing them through those are not rewritten.
- Termination message: `$KUBETUNE_TERMINATION_LOG` names a per-container file standing for
  terminationMessagePath (occurrences of that path are rewritten to it as well).
- Network: each pod gets its own loopback address 127.A.B.C (Linux routes all of 127/8 to lo;
  A is random per agent so parallel clusters on one machine do not collide). Cluster DNS names of
  pods, `<hostname>.<subdomain>.<ns>.svc[.cluster.local]`, in command, args and env values are
  replaced by the pod's IP; a container waits up to DNS_WAIT seconds for such a pod to appear.
- Image: the image is not pulled; the command runs on this machine with PATH led by the folder
  of the Python running the agent, so `python`, `torchrun`, ... are those of the test venv.
- `kubectl logs` works: the agent serves the kubelet's /containerLogs endpoint over TLS.

Event-driven, so that hundreds of pods at once do not queue behind each other: one worker thread
owns all pod state and sleeps until something happens (a watch event, a container process
exiting — a pidfd per process —, a timer of a pod, a finished API call); it looks only at the
pods concerned. API calls (bindings, status patches, deletions, volume reads) run on a small
thread pool and report back to the worker as events.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import json
import logging
import os
import queue
import random
import selectors
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from kubetune.timestamps import micro_timestamp

from . import pki
from .pods import (
    Conditions,
    ContainerConfigError,
    ContainerState,
    exit_code_of,
    expand,
    field_ref,
    now_iso,
    object_data,
    pod_phase,
    pod_status,
    resolve_env,
    rewrite_dns,
    rewrite_paths,
    schedulable,
    should_restart,
    tail_bytes,
    termination_message,
)

log = logging.getLogger("kubetune.node_agent")

NODE_NAME = "kt-node-0"
CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "8",
            "ephemeral-storage": "100Gi"}
TICK = 1.0                    # the longest the worker sleeps (heartbeats); pods wake it
POLL = 0.2                    # process poll interval where a pidfd cannot be had
RETRY = 1.0                   # seconds before a failed API call of a pod is tried again
IO_THREADS = 32               # API calls in flight at once: each waits out the API server's latency
LEASE_SECONDS, RENEW_EVERY, NODE_STATUS_EVERY = 40, 10.0, 60.0
DNS_WAIT = 30.0
BACKOFF = (1, 2, 4, 8, 10)    # container restart back-off, short for tests (kubelet: 10s..5m)
TERMINAL = ("Succeeded", "Failed")


class WaitingForDNS(Exception):
    pass


@dataclass
class PodRun:
    """The agent's record of one pod bound to its node."""
    pod: dict
    ip: str
    dir: Path
    created: float = field(default_factory=time.monotonic)
    start_time: str = field(default_factory=now_iso)
    volumes: dict[str, Path] | None = None
    init: list[ContainerState] = field(default_factory=list)
    app: list[ContainerState] = field(default_factory=list)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)   # restart back-off, retries
    conditions: Conditions = field(default_factory=Conditions)
    kill_at: float | None = None      # set once deletion started: SIGKILL deadline
    delete_sent: bool = False
    reported: dict | None = None
    report_after: float = 0.0
    retry_at: float = 0.0             # volumes or the final delete failed: try again then
    wake_at: float = 0.0              # the worker looks at this pod again then (0: no timer)
    busy: set[str] = field(default_factory=set)          # API calls in flight: "report", ...
    pidfds: dict[str, int] = field(default_factory=dict)  # container -> pidfd of its process

    def __post_init__(self) -> None:
        spec = self.pod["spec"]
        self.init = [ContainerState(c["name"], c.get("image", "")) for c in spec.get("initContainers") or []]
        self.app = [ContainerState(c["name"], c.get("image", "")) for c in spec["containers"]]

    @property
    def key(self) -> str:
        return f'{self.pod["metadata"]["namespace"]}/{self.pod["metadata"]["name"]}'

    @property
    def policy(self) -> str:
        return "Never" if self.kill_at is not None else self.pod["spec"].get("restartPolicy", "Always")

    def view(self) -> dict:
        """The pod as the kubelet sees it: with the IPs it assigned, even before reporting them."""
        status = {**(self.pod.get("status") or {}), "podIP": self.ip, "hostIP": "127.0.0.1"}
        return {**self.pod, "status": status}

    def phase(self) -> str:
        return pod_phase(self.init, self.app, self.policy)

    def next_look(self, now: float) -> float:
        """When a timer of this pod is due (0.0: none): restart back-off, kill deadline, retries."""
        times = [t for t in (*self.not_before.values(), self.report_after, self.retry_at) if t > now]
        if self.kill_at is not None and self.procs:
            times.append(self.kill_at)
        if any(name not in self.pidfds for name in self.procs):
            times.append(now + POLL)
        return min(times, default=0.0)

    def status(self) -> dict:
        phase = self.phase()
        init_done = all(c.state == "terminated" and c.exit_code == 0 for c in self.init)
        conds = self.conditions.build(phase, init_done, all(c.state == "running" for c in self.app))
        return pod_status(phase, conds, self.ip, self.start_time, self.init, self.app)


class NodeAgent:
    def __init__(self, kubeconfig: Path, root: Path, node_name: str = NODE_NAME,
                 labels: dict[str, str] | None = None, capacity: dict[str, str] | None = None,
                 env: dict[str, str] | None = None):
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)
        self.server = urllib.parse.urlparse(self.api_client.configuration.host)
        self.root, self.node = Path(root), node_name
        self.labels = {"kubernetes.io/hostname": node_name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", **(labels or {})}
        self.capacity = capacity or dict(CAPACITY)
        self.base_env = env if env is not None else default_env()
        self.runs: dict[str, PodRun] = {}          # pod uid -> run, pods bound to this node
        self.unschedulable: set[str] = set()
        self.events: queue.Queue = queue.Queue()   # (kind, payload) for the worker, see _post
        self.dirty: set[str] = set()               # uids of pods the worker must look at
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.io = concurrent.futures.ThreadPoolExecutor(IO_THREADS, "node-agent-io")
        # Status reports have threads of their own, as the kubelet's status manager does: a
        # container's exit reaches the API without queueing behind new pods' bindings and mounts.
        self.reports = concurrent.futures.ThreadPoolExecutor(IO_THREADS, "node-agent-report")
        self.stopping = threading.Event()
        self.net = random.randint(16, 250)
        self.ips_given = 0
        self.next_lease = self.next_node_status = 0.0
        self.threads: list[threading.Thread] = []
        self.log_server: http.server.ThreadingHTTPServer | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "NodeAgent":
        (self.root / "pods").mkdir(parents=True, exist_ok=True)
        self.log_handler = logging.FileHandler(self.root / "agent.log")
        self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self.log_handler)
        log.setLevel(logging.INFO)
        self.log_server = serve_logs(self, self.root / "kubelet-tls")
        self._register_node()
        for target, name in ((self._watch_pods, "watch"), (self._work, "work")):
            t = threading.Thread(target=target, name=f"node-agent-{name}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._wake()
        for t in self.threads:
            t.join(timeout=5 if t.name.endswith("work") else 0.5)
        self.io.shutdown(wait=False, cancel_futures=True)
        self.reports.shutdown(wait=False, cancel_futures=True)
        kill_runs(list(self.runs.values()), signal.SIGKILL)
        self.selector.close()
        for fd in [self._wake_r, self._wake_w] + [fd for run in self.runs.values() for fd in run.pidfds.values()]:
            os.close(fd)
        if self.log_server:
            self.log_server.shutdown()
        log.removeHandler(self.log_handler)
        self.log_handler.close()
        self.api_client.close()

    def __enter__(self) -> "NodeAgent":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- debugging helpers ------------------------------------------------------------------
    def find(self, namespace: str, name: str) -> PodRun | None:
        return next((r for r in list(self.runs.values()) if r.key == f"{namespace}/{name}"), None)

    def log_path(self, namespace: str, name: str, container: str) -> Path | None:
        run = self.find(namespace, name)
        return run.dir / "logs" / f"{container}.log" if run else None

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        """A pod's container output (all containers when none is named)."""
        run = self.find(namespace, name)
        if run is None:
            return ""
        files = sorted((run.dir / "logs").glob(f"{container or '*'}.log"))
        return "".join(f.read_text(errors="replace") for f in files)

    # -- the API side: node, lease, watch ---------------------------------------------------
    def _register_node(self) -> None:
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node, "labels": self.labels}}
        try:
            self.core.create_node(body, _preload_content=False)
        except ApiException as e:
            if e.status != 409:
                raise
        # Admission adds the not-ready taint at creation; nothing here would lift it, and the
        # node is ready from the start.
        self.core.patch_node(self.node, {"metadata": {"labels": self.labels}, "spec": {"taints": None}},
                             _preload_content=False)
        self._push_node_status()

    def _push_node_status(self) -> None:
        now = now_iso()
        conditions = [{"type": t, "status": s, "reason": r, "lastHeartbeatTime": now,
                       "lastTransitionTime": now}
                      for t, s, r in (("Ready", "True", "KubeletReady"),
                                      ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                                      ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                                      ("PIDPressure", "False", "KubeletHasSufficientPID"))]
        status = {"capacity": self.capacity, "allocatable": self.capacity, "conditions": conditions,
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                {"type": "Hostname", "address": self.node}],
                  "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.server_port}},
                  "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                               "osImage": "kubetune test node agent", "kubeProxyVersion": "",
                               "containerRuntimeVersion": "kubetune://local",
                               "kubeletVersion": "v1.35.4", "operatingSystem": "linux",
                               "architecture": "amd64"}}
        self.core.patch_node_status(self.node, {"status": status}, _preload_content=False)

    def _renew_lease(self) -> None:
        ns, renew = "kube-node-lease", micro_timestamp(datetime.now(timezone.utc))
        patch = {"spec": {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS,
                          "renewTime": renew}}
        try:
            self.coordination.patch_namespaced_lease(self.node, ns, patch, _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise
            # Created without renewTime: the client's typed create body would reformat that
            # MicroTime into a form the API server refuses; the next patch sets it.
            self.coordination.create_namespaced_lease(ns, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node, "namespace": ns},
                "spec": {"holderIdentity": self.node}}, _preload_content=False)
            self.coordination.patch_namespaced_lease(self.node, ns, patch, _preload_content=False)

    def _watch_pods(self) -> None:
        """List, then watch from that version; on any failure (expired version, API server
        restart) list again. Events go to the worker thread, which alone owns the state."""
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                listed = json.loads(self.core.list_pod_for_all_namespaces(
                    _preload_content=False, _request_timeout=10).data)
                self._post("SYNC", listed["items"])
                version, backoff = listed["metadata"]["resourceVersion"], 0.5
                while not self.stopping.is_set():
                    version = self._watch_once(version)
            except Exception as e:  # noqa: BLE001 - any failure means: re-list
                if not self.stopping.is_set():
                    log.info("pod watch restarts after %s: %s", type(e).__name__, e)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)

    def _watch_once(self, version: str) -> str:
        resp = self.core.list_pod_for_all_namespaces(
            watch=True, resource_version=version, allow_watch_bookmarks=True, timeout_seconds=30,
            _preload_content=False, _request_timeout=(5, 45))
        try:
            for line in iter_resp_lines(resp):
                event = json.loads(line)
                if event["type"] == "ERROR":
                    raise RuntimeError(f"watch error: {event['object'].get('message')}")
                version = event["object"]["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    self._post(event["type"], event["object"])
                if self.stopping.is_set():
                    break
        finally:
            resp.release_conn()
        return version

    # -- the worker: events in, processes and status out ------------------------------------
    def _post(self, kind: str, payload) -> None:
        """Hand something to the worker, from any thread."""
        self.events.put((kind, payload))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:   # the pipe is full: the worker is awake anyway
            pass

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                self._wait(self._sleep_for())
                while True:
                    self._handle(*self.events.get_nowait())
            except queue.Empty:
                pass
            except Exception:  # noqa: BLE001 - one bad pod must not stop the node
                log.exception("node agent event handling failed")
            self._tick()

    def _sleep_for(self) -> float:
        if self.dirty or not self.events.empty():
            return 0.0
        now = time.monotonic()
        due = min((r.wake_at for r in self.runs.values() if r.wake_at), default=now + TICK)
        return max(0.0, min(due, self.next_lease, self.next_node_status, now + TICK) - now)

    def _wait(self, timeout: float) -> None:
        """Sleep until woken: by _post (the pipe) or by a container process exiting (its pidfd)."""
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                self.dirty.add(key.data)

    def _io(self, run: PodRun, what: str, call, *args) -> None:
        """Run an API call of a pod on the pool; its outcome comes back as a DONE event."""
        run.busy.add(what)
        uid = run.pod["metadata"]["uid"]

        def task() -> None:
            try:
                outcome = call(*args)
            except Exception as e:  # noqa: BLE001 - the worker decides what a failure means
                outcome = e
            self._post("DONE", (uid, what, outcome))
        (self.reports if what == "report" else self.io).submit(task)

    def _background(self, what: str, call, *args) -> None:
        """An API call nobody waits for (a binding, a heartbeat): failures are only logged."""
        def task() -> None:
            try:
                call(*args)
            except Exception as e:  # noqa: BLE001
                log.info("%s failed: %s", what, e)
        self.io.submit(task)

    def _handle(self, kind: str, obj) -> None:
        if kind == "DONE":
            self._done(*obj)
        elif kind == "SYNC":
            live = {p["metadata"]["uid"] for p in obj}
            for uid in [u for u in self.runs if u not in live]:
                self._forget(uid)
            for pod in obj:
                self._observe(pod)
        elif kind == "DELETED":
            self._forget(obj["metadata"]["uid"])
        else:
            self._observe(obj)

    def _observe(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if not spec.get("nodeName"):
            if not meta.get("deletionTimestamp"):
                self._schedule(pod)
            return
        if spec["nodeName"] != self.node:
            return
        run = self.runs.get(uid)
        if run is None:
            if (pod.get("status") or {}).get("phase") in TERMINAL:   # finished before a restart
                if meta.get("deletionTimestamp"):
                    self._background(f"deleting pod {meta['name']}", self._delete_now,
                                     meta["namespace"], meta["name"], uid)
                return
            run = self.runs[uid] = self._new_run(pod)
        run.pod = pod
        self.dirty.add(uid)
        if meta.get("deletionTimestamp") and run.kill_at is None:
            grace = meta.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds", 30))
            self._begin_termination(run, float(grace))

    def _new_run(self, pod: dict) -> PodRun:
        meta = pod["metadata"]
        n, self.ips_given = self.ips_given, self.ips_given + 1
        ip = f"127.{self.net}.{n // 250}.{n % 250 + 2}"
        folder = self.root / "pods" / f'{meta["namespace"]}_{meta["name"]}_{meta["uid"][:8]}'
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        return PodRun(pod=pod, ip=ip, dir=folder)

    def _schedule(self, pod: dict) -> None:
        meta = pod["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if schedulable(pod, self.labels):
            self._background(f"binding pod {ns}/{name}", self._bind, ns, name)
        elif uid not in self.unschedulable and not pod["spec"].get("schedulingGates"):
            self.unschedulable.add(uid)
            cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "lastTransitionTime": now_iso(),
                    "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node "
                               "affinity/selector."}
            self._background(f"reporting pod {ns}/{name} unschedulable", self.core.patch_namespaced_pod_status,
                             name, ns, {"status": {"conditions": [cond]}})

    def _bind(self, ns: str, name: str) -> None:
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}}
        try:
            self.core.create_namespaced_pod_binding(name, ns, binding, _preload_content=False)
        except ApiException as e:
            if e.status not in (404, 409):   # gone, or bound meanwhile
                raise

    def _forget(self, uid: str) -> None:
        run = self.runs.pop(uid, None)
        if run:
            kill_all(run, signal.SIGKILL)
            for name in list(run.pidfds):
                self._untrack(run, name)

    def _tick(self) -> None:
        """Look at the pods that changed or whose timer is due, and at nothing else."""
        now = time.monotonic()
        due = [run for uid, run in self.runs.items()
               if uid in self.dirty or (run.wake_at and run.wake_at <= now)]
        self.dirty.clear()
        # One scan of the processes for everything the exited containers left behind.
        signal_marked([mark for run in due for mark in self._reap(run)], signal.SIGKILL)
        for run in due:
            try:
                self._advance(run, now)
                self._report(run, now)
                if run.kill_at is not None and not run.procs and not run.delete_sent \
                        and "delete" not in run.busy and now >= run.retry_at and run.reported == run.status():
                    meta = run.pod["metadata"]
                    self._io(run, "delete", self._delete_now, meta["namespace"], meta["name"], meta["uid"])
            except Exception:  # noqa: BLE001
                log.exception("node agent: pod %s", run.key)
            run.wake_at = run.next_look(now)
        if now >= self.next_lease:
            self.next_lease = now + RENEW_EVERY
            self._background("renewing the node lease", self._heartbeat, self._renew_lease)
        if now >= self.next_node_status:
            self.next_node_status = now + NODE_STATUS_EVERY
            self._background("pushing the node status", self._heartbeat, self._push_node_status)

    def _heartbeat(self, push) -> None:
        try:
            push()
        except Exception:   # API server away: retry soon
            self.next_lease = time.monotonic() + 1.0
            raise

    def _report(self, run: PodRun, now: float) -> None:
        if "report" in run.busy or now < run.report_after:
            return   # a report in flight: its outcome makes the worker look again
        status = run.status()
        if status != run.reported:
            meta = run.pod["metadata"]
            self._io(run, "report", self._patch_status, meta["namespace"], meta["name"], status)

    def _patch_status(self, ns: str, name: str, status: dict) -> dict:
        self.core.patch_namespaced_pod_status(name, ns, {"status": status}, _preload_content=False)
        return status

    def _done(self, uid: str, what: str, outcome) -> None:
        """An API call of a pod came back (on the worker thread, which owns the pod's state)."""
        run = self.runs.get(uid)
        if run is None:
            return
        run.busy.discard(what)
        self.dirty.add(uid)
        now = time.monotonic()
        if what == "report":
            if isinstance(outcome, ApiException) and outcome.status == 404:
                self._forget(uid)
            elif isinstance(outcome, Exception):
                run.report_after = now + RETRY   # API server away: retry
            else:
                run.reported = outcome
        elif what == "delete":
            run.delete_sent = outcome is True
            run.retry_at = 0.0 if run.delete_sent else now + RETRY
        elif what == "volumes":
            if isinstance(outcome, Exception):
                message = str(outcome) if isinstance(outcome, ContainerConfigError) else repr(outcome)
                for c in run.init + run.app:
                    c.waiting("ContainerCreating", f"MountVolume failed: {message}")
                run.retry_at = now + RETRY
            else:
                run.volumes = outcome

    def _delete_now(self, ns: str, name: str, uid: str) -> bool:
        try:
            # With a body the API server ignores the query parameters: grace goes in the body.
            self.core.delete_namespaced_pod(name, ns, body={"gracePeriodSeconds": 0,
                                                            "preconditions": {"uid": uid}},
                                            _preload_content=False)
        except ApiException as e:
            return e.status in (404, 409)
        except Exception as e:  # noqa: BLE001 - API server away: retry
            log.info("deleting pod %s/%s failed: %s", ns, name, e)
            return False
        return True

    # -- containers -------------------------------------------------------------------------
    def _advance(self, run: PodRun, now: float) -> None:
        if run.kill_at is not None:
            if run.procs and now >= run.kill_at:
                kill_all(run, signal.SIGKILL)
            return
        if run.phase() in TERMINAL:
            return
        if run.volumes is None:
            if "volumes" not in run.busy and now >= run.retry_at:
                self._io(run, "volumes", self._materialize_volumes, run)
            return
        spec = run.pod["spec"]
        for c, state in zip(spec.get("initContainers") or [], run.init, strict=True):
            if not (state.state == "terminated" and state.exit_code == 0):
                # Init containers restart on failure unless the pod's policy is Never.
                self._drive(run, c, state, "Never" if run.policy == "Never" else "OnFailure", now)
                return
        for c, state in zip(spec["containers"], run.app, strict=True):
            self._drive(run, c, state, run.policy, now)

    def _drive(self, run: PodRun, c: dict, state: ContainerState, policy: str, now: float) -> None:
        name = c["name"]
        if state.state == "running":
            return
        if state.state == "terminated":
            if should_restart(policy, state.exit_code):
                state.restarting()
                run.not_before[name] = now + BACKOFF[min(state.restart_count - 1, len(BACKOFF) - 1)]
            return
        if now < run.not_before.get(name, 0.0):
            return
        try:
            self._spawn(run, c, state)
        except ContainerConfigError as e:
            state.waiting("CreateContainerConfigError", str(e))
            run.not_before[name] = now + 1.0
        except WaitingForDNS as e:
            state.waiting("ContainerCreating", f"waiting for cluster DNS names: {e}")
            run.not_before[name] = now + 0.5

    def _spawn(self, run: PodRun, c: dict, state: ContainerState) -> None:
        argv, env, cwd = self._process_spec(run, c)
        env = {**env, CONTAINER_MARK: container_mark(run, c["name"])}
        with open(run.dir / "logs" / f"{c['name']}.log", "ab") as out:
            try:
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                state.terminated(128, f"failed to start {argv[0]}: {e}", reason="StartError")
                return
        run.procs[c["name"]] = proc
        state.running(proc.pid)
        try:
            run.pidfds[c["name"]] = fd = os.pidfd_open(proc.pid)
            self.selector.register(fd, selectors.EVENT_READ, run.pod["metadata"]["uid"])
        except OSError:   # no pidfds here (or the process is gone already): polled instead
            run.pidfds.pop(c["name"], None)

    def _untrack(self, run: PodRun, container: str) -> None:
        fd = run.pidfds.pop(container, None)
        if fd is not None:
            self.selector.unregister(fd)
            os.close(fd)

    def _process_spec(self, run: PodRun, c: dict) -> tuple[list[str], dict[str, str], str]:
        """argv, environment and working folder of one container, with the stand-ins applied."""
        if not c.get("command"):
            raise ContainerConfigError("the node agent needs an explicit command (it cannot read "
                                       "an image's entrypoint)")
        cdir = run.dir / "containers" / c["name"]
        cdir.mkdir(parents=True, exist_ok=True)
        term = cdir / "termination-log"
        term.write_bytes(b"")
        mounts = {c.get("terminationMessagePath", "/dev/termination-log"): str(term)}
        for m in c.get("volumeMounts") or []:
            if m["name"] not in run.volumes:
                raise ContainerConfigError(f'volume "{m["name"]}" not found')
            mounts[m["mountPath"]] = str(run.volumes[m["name"]] / m.get("subPath", "")).rstrip("/")
        pod = run.view()
        env = resolve_env(c, pod, self._lookup, self._service_env(pod))
        raw_argv = [expand(a, env) for a in (c["command"] + (c.get("args") or []))]
        missing: list[str] = []

        def stand_in(text: str) -> str:
            text, unresolved = rewrite_dns(rewrite_paths(text, mounts), self._resolve_pod_dns)
            missing.extend(unresolved)
            return text
        argv = [stand_in(a) for a in raw_argv]
        env = {**self.base_env, **{k: stand_in(v) for k, v in env.items()},
               "KUBETUNE_TERMINATION_LOG": str(term)}
        if missing and time.monotonic() - run.created < DNS_WAIT:
            raise WaitingForDNS(", ".join(sorted(set(missing))))
        cwd = str(cdir)
        if c.get("workingDir"):
            mapped = stand_in(c["workingDir"])
            if mapped != c["workingDir"]:
                Path(mapped).mkdir(parents=True, exist_ok=True)
                cwd = mapped
        return argv, env, cwd

    def _service_env(self, pod: dict) -> dict[str, str]:
        host, port = self.server.hostname, str(self.server.port or 443)
        return {"HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
                "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_PORT": f"tcp://{host}:{port}"}

    def _resolve_pod_dns(self, hostname: str, subdomain: str, namespace: str) -> str | None:
        for run in list(self.runs.values()):
            meta, spec = run.pod["metadata"], run.pod["spec"]
            if (meta["namespace"] == namespace and spec.get("subdomain") == subdomain
                    and (spec.get("hostname") or meta["name"]) == hostname):
                return run.ip
        return None

    def _reap(self, run: PodRun) -> list[str]:
        """Record the containers whose process exited; their marks, for what they left behind."""
        marks = []
        specs = {c["name"]: c for c in (run.pod["spec"].get("initContainers") or []) + run.pod["spec"]["containers"]}
        states = {s.name: s for s in run.init + run.app}
        for name, proc in list(run.procs.items()):
            if proc.poll() is None:
                continue
            signal_group(proc.pid, signal.SIGKILL)   # what the container left behind dies with it
            marks.append(container_mark(run, name))
            self._untrack(run, name)
            del run.procs[name]
            code = exit_code_of(proc.returncode)
            term = run.dir / "containers" / name / "termination-log"
            logfile = run.dir / "logs" / f"{name}.log"
            message = termination_message(term.read_bytes() if term.exists() else b"",
                                          tail_bytes(logfile, 4096), code,
                                          specs[name].get("terminationMessagePolicy", "File"))
            states[name].terminated(code, message)
        return marks

    def _begin_termination(self, run: PodRun, grace: float) -> None:
        run.kill_at = time.monotonic() + grace
        kill_all(run, signal.SIGTERM)
        for state in run.init + run.app:
            if state.state == "waiting":   # never started: the kubelet reports these so too
                state.terminated(137, "The container could not be located when the pod was deleted.",
                                 reason="ContainerStatusUnknown")

    # -- volumes ----------------------------------------------------------------------------
    def _lookup(self, kind: str, namespace: str, name: str) -> dict | None:
        """A ConfigMap, Secret or claim, or None. Read from the API server's watch cache (a list
        at resourceVersion 0), as a kubelet reads through its watch-fed cache: no etcd read per
        pod. One created a moment ago may not be there yet: "not found" for now, and the
        caller tries again."""
        list_one = {"ConfigMap": self.core.list_namespaced_config_map,
                    "Secret": self.core.list_namespaced_secret,
                    "PersistentVolumeClaim": self.core.list_namespaced_persistent_volume_claim}[kind]
        items = json.loads(list_one(namespace, field_selector=f"metadata.name={name}", resource_version="0",
                                    _preload_content=False).data)["items"]
        return {**items[0], "kind": kind} if items else None

    def _materialize_volumes(self, run: PodRun) -> dict[str, Path]:
        pod, out = run.view(), {}
        ns = pod["metadata"]["namespace"]
        for vol in pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if self._lookup("PersistentVolumeClaim", ns, claim) is None:
                    raise ContainerConfigError(f'persistentvolumeclaim "{claim}" not found')
                out[name] = self.root / "pvc" / ns / claim
                out[name].mkdir(parents=True, exist_ok=True)
                continue
            target = run.dir / "volumes" / name
            target.mkdir(parents=True, exist_ok=True)
            sources = (vol["projected"].get("sources") or []) if "projected" in vol else [vol]
            for src in sources:
                for rel, data, mode in self._volume_files(src, pod):
                    write_file(target / rel, data, mode)
            if not ({"emptyDir", "projected", "configMap", "secret", "downwardAPI"} & set(vol)):
                raise ContainerConfigError(f"volume {name}: unsupported type {sorted(set(vol) - {'name'})}")
            out[name] = target
        return out

    def _volume_files(self, src: dict, pod: dict):
        """(relative path, bytes, mode) of one volume source."""
        ns = pod["metadata"]["namespace"]
        for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
            if key in src:
                ref = src[key]
                name = ref.get("name") or ref.get("secretName")
                obj = self._lookup(kind, ns, name)
                if obj is None:
                    if ref.get("optional"):
                        return
                    raise ContainerConfigError(f'{key} "{name}" not found')
                data = object_data(obj)
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] not in data:
                        raise ContainerConfigError(f'key {item["key"]} not in {key} {name}')
                    yield item["path"], data[item["key"]], item.get("mode", ref.get("defaultMode"))
        if "downwardAPI" in src:
            for item in src["downwardAPI"].get("items") or []:
                if "fieldRef" not in item:
                    raise ContainerConfigError("downwardAPI: only fieldRef items are supported")
                yield item["path"], field_ref(pod, item["fieldRef"]["fieldPath"]).encode(), item.get("mode")
        if "serviceAccountToken" in src:
            tok = src["serviceAccountToken"]
            yield tok["path"], self._token(pod, tok).encode(), 0o600

    def _token(self, pod: dict, source: dict) -> str:
        meta = pod["metadata"]
        spec = {"expirationSeconds": source.get("expirationSeconds", 3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                   "uid": meta["uid"]}}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        resp = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName", "default"), meta["namespace"],
            {"spec": spec}, _preload_content=False)
        return json.loads(resp.data)["status"]["token"]


# -- small process and file helpers -----------------------------------------------------------
def default_env() -> dict[str, str]:
    """The "image" environment: this Python's folder first on PATH, so `python` is the venv's;
    OMP_NUM_THREADS passes on (the test lanes run many torch processes on few cores)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])
    env = {"PATH": path, "LANG": os.environ.get("LANG", "C.UTF-8")}
    env.update({k: os.environ[k] for k in ("PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS") if k in os.environ})
    return env


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# A cgroup stand-in: every process a container starts inherits this variable, even those that
# leave its process group (torchrun starts its workers in sessions of their own).
CONTAINER_MARK = "KUBETUNE_NODE_AGENT_CONTAINER"


def container_mark(run: PodRun, container: str) -> str:
    return f"{run.dir.name}/{container}"


def signal_marked(marks: list[str], sig: int) -> None:
    """Signal every process whose environment carries one of `marks`, in one pass over /proc
    (read directly: psutil costs about 1 ms a process, and a busy node runs hundreds)."""
    wanted = {f"{CONTAINER_MARK}={mark}".encode() for mark in marks}
    if not wanted:
        return
    key = CONTAINER_MARK.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
            if key in environ and wanted.intersection(environ.split(b"\0")):
                os.kill(int(entry.name), sig)
        except (OSError, ValueError):   # gone meanwhile, or not ours to read
            pass


def kill_all(run: PodRun, sig: int) -> None:
    kill_runs([run], sig)


def kill_runs(runs: list[PodRun], sig: int) -> None:
    """Signal every process of `runs`, with one pass over /proc for all of them (a pass a pod
    took minutes to stop 1,000 pods)."""
    for run in runs:
        for proc in run.procs.values():
            signal_group(proc.pid, sig)
    signal_marked([container_mark(run, name) for run in runs for name in run.procs], sig)
    if sig == signal.SIGKILL:
        for run in runs:
            for proc in run.procs.values():
                proc.wait()


def write_file(path: Path, data: bytes, mode: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode if mode is not None else 0o644)


# -- kubelet /containerLogs endpoint, so `kubectl logs` works ----------------------------------
def serve_logs(agent: NodeAgent, tls_dir: Path) -> http.server.ThreadingHTTPServer:
    tls_dir.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca(tls_dir, "kt-node-0-ca")
    cert = pki.issue(ca, tls_dir, "kubelet", agent.node, ips=("127.0.0.1",))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            parts, query = url.path.strip("/").split("/"), urllib.parse.parse_qs(url.query)
            path = agent.log_path(*parts[1:4]) if len(parts) == 4 and parts[0] == "containerLogs" else None
            if path is None or not path.exists():
                self.send_error(404, "no such container log")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            data = path.read_bytes()
            lines = data.splitlines(keepends=True)
            if "tailLines" in query:
                lines = lines[-int(query["tailLines"][0]):]
            self.wfile.write(b"".join(lines))
            if query.get("follow") == ["true"]:
                self._follow(path, len(data), parts)

        def _follow(self, path: Path, offset: int, parts: list[str]) -> None:
            run = agent.find(parts[1], parts[2])
            while run and parts[3] in run.procs and not agent.stopping.is_set():
                time.sleep(0.2)
                chunk = path.read_bytes()[offset:]
                offset += len(chunk)
                self.wfile.write(chunk)
                self.wfile.flush()
            self.wfile.write(path.read_bytes()[offset:])

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert.cert), str(cert.key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="node-agent-logs", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    """Run the agent against a kubeconfig until interrupted: python -m tests.cluster.node_agent"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--root", type=Path, help="folder for pod files (default: a temp folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    root = args.root or Path(tempfile.mkdtemp(prefix="kubetune-node-"))
    agent = NodeAgent(args.kubeconfig, root).start()
    print(f"node {agent.node} up; pod files under {root}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
