"""The control-plane bench's baseline: the least any controller must do for the same children.

`bench/control_plane.py --driver floor` runs this process where the operator would run, on the
same Python and settings. It makes each run's children with the operator's own builders
(`kubetune.manifests`: the ConfigMap, the Service, the data-prep Job, the training Job, the
finalize Job) and writes the run's status twice (Trained when its training pod has exited,
Succeeded when its finalize pod has): no validation, no status before that, no Events, no
finalizer, no cache but what it remembers having done. What the cluster then takes (the API
server, etcd, the Job controller, the garbage collector, the node agent) is the floor the
machine sets for any operator of these runs; the operator's figures over this one's are its
own overhead.

    python bench/floor_driver.py NAMESPACE   (KUBECONFIG and the operator's KUBETUNE_* settings)
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from kubernetes import config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from kubetune.api import GROUP, PLURAL, VERSION, parse_training_run
from kubetune.k8s.rest import MERGE_PATCH, Rest, collection, member
from kubetune.manifests import (LABEL_COMPONENT, LABEL_RUN, BuildContext, build_config_map, build_finalize_job,
                                build_prep_job, build_service, build_train_job)
from kubetune.resolve import resolve_config
from kubetune.settings import OperatorSettings

RUNS = f"{GROUP}/{VERSION}"
PLURALS = {"ConfigMap": ("v1", "configmaps"), "Service": ("v1", "services"), "Job": ("batch/v1", "jobs")}


class Floor:
    def __init__(self, rest: Rest, namespace: str, settings: OperatorSettings, workers: int = 32):
        self.rest, self.namespace, self.settings = rest, namespace, settings
        self.pool = ThreadPoolExecutor(workers)  # the operator's reconcile workers, as many
        # A write beside a task's own: waiting on the same pool would deadlock a full one.
        self.side = ThreadPoolExecutor(workers)
        self.contexts: dict[str, BuildContext] = {}
        self.done: set[tuple[str, str]] = set()  # (run, what) already written
        self.lock = threading.Lock()

    def once(self, run: str, what: str) -> bool:
        with self.lock:
            first = (run, what) not in self.done
            self.done.add((run, what))
        return first

    def create(self, manifest: dict) -> None:
        api_version, plural = PLURALS[manifest["kind"]]
        try:
            self.rest.send("POST", collection(api_version, plural, self.namespace), body=manifest)
        except ApiException as error:
            if error.status != 409:  # made already, by an earlier try
                raise

    def submit(self, action, *args) -> None:
        """Run `action` on the pool, again after an error (said on stderr) until it succeeds."""
        def attempt() -> None:
            try:
                action(*args)
            except Exception as error:  # noqa: BLE001 - a baseline: say it, try again
                print(f"floor driver: {action.__name__}{args[:1]} failed, again in 1s: {error}",
                      file=sys.stderr, flush=True)
                threading.Timer(1.0, self.pool.submit, (attempt,)).start()
        self.pool.submit(attempt)

    def run_added(self, body: dict) -> None:
        run = parse_training_run(body)
        ctx = BuildContext(run, self.settings, resolve_config(run, self.settings))
        self.contexts[run.metadata.name] = ctx
        self.create(build_config_map(ctx))  # the pods mount it: before their Job
        service = self.side.submit(self.create, build_service(ctx))
        try:
            self.create(build_prep_job(ctx))
        finally:
            service.result()

    def prep_exited(self, name: str) -> None:
        self.create(build_train_job(self.contexts[name]))

    def patch_status(self, name: str, phase: str) -> None:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {"type": "Trained", "status": "True", "reason": "TrainingComplete", "message": "",
                     "lastTransitionTime": now}
        self.rest.send("PATCH", member(RUNS, PLURAL, self.namespace, name, "status"),
                       body={"status": {"phase": phase, "conditions": [condition]}}, content_type=MERGE_PATCH)

    def train_exited(self, name: str) -> None:
        status = self.side.submit(self.patch_status, name, "Training")
        self.create(build_finalize_job(self.contexts[name]))
        status.result()

    def on_run(self, body: dict) -> None:
        if self.once(body["metadata"]["name"], "added"):
            self.submit(self.run_added, body)

    def on_pod(self, pod: dict) -> None:
        labels = pod["metadata"].get("labels") or {}
        run, component = labels.get(LABEL_RUN), labels.get(LABEL_COMPONENT)
        if (pod.get("status") or {}).get("phase") != "Succeeded" or run is None:
            return
        if component == "prep" and self.once(run, "prep exited"):
            self.submit(self.prep_exited, run)
        elif component == "train" and self.once(run, "train exited"):
            self.submit(self.train_exited, run)
        elif component == "finalize" and self.once(run, "finalized"):
            self.submit(self.patch_status, run, "Succeeded")

    def watch(self, path: str, query: list[tuple[str, str]], handle) -> None:
        while True:
            try:
                response = self.rest.request("GET", path, query=[("watch", "1"), *query], timeout=(10, 330))
                for line in iter_resp_lines(response):
                    event = json.loads(line)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        handle(event["object"])
            except Exception as error:  # noqa: BLE001 - a baseline's watch: watch again
                print(f"floor driver: watch of {path} ended: {error}", file=sys.stderr, flush=True)
                time.sleep(0.5)


def main(namespace: str) -> None:
    try:
        rest = Rest(config.new_client_from_config())
    except config.ConfigException as error:
        sys.exit(f"floor driver: no cluster to drive: {error} (set KUBECONFIG)")
    floor = Floor(rest, namespace, OperatorSettings.from_env())
    pods = threading.Thread(target=floor.watch, daemon=True, args=(
        collection("v1", "pods", namespace), [("labelSelector", f"{LABEL_COMPONENT} in (prep,train,finalize)")],
        floor.on_pod))
    pods.start()
    floor.watch(collection(RUNS, PLURAL, namespace), [], floor.on_run)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: floor_driver.py NAMESPACE (KUBECONFIG names the cluster; "
                 "bench/control_plane.py --driver floor starts it)")
    main(sys.argv[1])
