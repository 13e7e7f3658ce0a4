"""The e2e operator as pods on real nodes of this machine, installed by the Helm chart.

`ChartOperator` is the chart's Deployment with the interface the tests use on `OperatorProcess`
(conftest.py): `start`/`stop`/`kill`, `alive`, `log` (a file of this machine), `log_tail`,
`metrics_address`, `standby`. The log holds every operator container's output in the order they
ran, copied from the API server whenever it is read: a deleted pod's log goes with the pod, and
byte offsets into it (`log_size`) must stay valid across restarts.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from tests.cluster.node import NodeError

CONTAINER = "operator"   # the chart's container name
GONE_TIMEOUT = 90


class OperatorPods:
    """Some operator pods (a label selector) and the log of every container they ran."""

    def __init__(self, cluster, namespace: str, selector: str, log: Path):
        self.cluster, self.namespace, self.selector, self._log = cluster, namespace, selector, log
        self.api = cluster.api_client()
        self.core = client.CoreV1Api(self.api)
        self._copied: dict[str, int] = {}   # container id → bytes of its log already in the file
        self._complete: set[str] = set()    # containers that ended and were copied to the end

    def pods(self) -> list[Any]:
        items = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                              _request_timeout=10).items
        return sorted(items, key=lambda p: p.metadata.creation_timestamp)

    def running_pods(self) -> list[Any]:
        return [p for p in self.pods() if p.status.phase == "Running" and p.status.pod_ip
                and not p.metadata.deletion_timestamp]

    @property
    def metrics_address(self) -> str:
        """host:port of the running pod's metrics port (this machine routes pod IPs)."""
        pods = self.running_pods()
        if not pods:
            raise LookupError(f"no running operator pod ({self.selector})")
        port = next(p.container_port for c in pods[0].spec.containers for p in c.ports or [] if p.name == "metrics")
        return f"{pods[0].status.pod_ip}:{port}"

    # -- the log --------------------------------------------------------------------------------
    @property
    def log(self) -> Path:
        """The log file, brought up to date first."""
        self.sync()
        return self._log

    def log_tail(self, size: int = 6000) -> str:
        log = self.log
        return log.read_bytes()[-size:].decode(errors="replace") if log.exists() else ""

    def sync(self) -> None:
        """Append what the containers wrote since the last look: a restarted container's previous
        instance first (kubelet keeps one), then the current one."""
        self._log.touch()
        try:
            pods = self.pods()
        except (ApiException, HTTPError, OSError):
            return   # the API server is away (a test restarts it): the next look catches up
        for pod in pods:
            for status in pod.status.container_statuses or []:
                last = status.last_state.terminated if status.last_state else None
                if last and last.container_id:
                    self._copy(pod, last.container_id, previous=True, ended=True)
                if status.container_id and not (status.state and status.state.waiting):
                    self._copy(pod, status.container_id, previous=False,
                               ended=bool(status.state and status.state.terminated))

    def _copy(self, pod, container_id: str, previous: bool, ended: bool) -> None:
        if container_id in self._complete:
            return
        try:
            data = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, container=CONTAINER,
                                                     previous=previous, _preload_content=False,
                                                     _request_timeout=10).data
        except (ApiException, HTTPError, OSError):
            return
        with open(self._log, "ab") as out:
            out.write(data[self._copied.get(container_id, 0):])
        self._copied[container_id] = len(data)
        if ended:
            self._complete.add(container_id)

    # -- faults ---------------------------------------------------------------------------------
    def kill_containers(self) -> None:
        """SIGKILL each running operator container's main process: no goodbye, the Lease stays
        held until it expires."""
        self.sync()
        for pod in self.running_pods():
            try:
                self.cluster.kubelets.nodes.kill_main_process(self.namespace, pod.metadata.name, CONTAINER,
                                                              signal.SIGKILL)
            except NodeError:
                pass   # between two runs of a crashing container: nothing to kill

    def wait_gone(self, timeout: float = GONE_TIMEOUT) -> None:
        """Until no pod is left, copying their logs meanwhile (they go with the pods)."""
        deadline = time.monotonic() + timeout
        while True:
            self.sync()
            if not self.pods():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator pods ({self.selector}) still there after {timeout:.0f}s")
            time.sleep(0.5)

    def close(self) -> None:
        self.api.close()


class ChartOperator(OperatorPods):
    """The chart's Deployment: started and stopped by scaling it (1 replica, or none)."""

    def __init__(self, cluster, kubectl, namespace: str, deployment: str, selector: str, log: Path):
        super().__init__(cluster, namespace, selector, log)
        self.kubectl, self.deployment, self.up = kubectl, deployment, True

    def scale(self, replicas: int) -> None:
        self.kubectl("scale", f"deployment/{self.deployment}", "-n", self.namespace, f"--replicas={replicas}")

    def start(self) -> ChartOperator:
        self.scale(1)
        self.up = True
        return self

    def stop(self) -> None:
        """A clean stop (SIGTERM, the Lease handed back), and no replacement until `start`."""
        self.up = False
        self.scale(0)
        self.wait_gone()

    def kill(self) -> None:
        """As an OOM kill or a node loss would: no goodbye, and no replacement until `start`
        (the pod goes; a container the kubelet restarted meanwhile cannot win the held Lease)."""
        self.kill_containers()
        self.up = False
        self.scale(0)
        self.wait_gone()

    def alive(self) -> bool:
        return self.up   # a crashed container is restarted by the kubelet, as in production

    def standby(self, folder: Path) -> StandbyPod:
        """A second replica: a pod of the Deployment's template, labelled apart so that its
        ReplicaSet does not adopt it."""
        template = self.kubectl.json("get", f"deployment/{self.deployment}", "-n", self.namespace)[
            "spec"]["template"]
        name = f"{self.deployment}-standby"
        pod = {"apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
               "metadata": {"name": name, "namespace": self.namespace, "labels": {"kubetune.dev/e2e-standby": name}}}
        return StandbyPod(self.cluster, self.kubectl, pod, folder / "standby.log")


class StandbyPod(OperatorPods):
    """One operator pod of its own, created by `start`, deleted by `stop`."""

    def __init__(self, cluster, kubectl, manifest: dict, log: Path):
        meta = manifest["metadata"]
        super().__init__(cluster, meta["namespace"], f"kubetune.dev/e2e-standby={meta['name']}", log)
        self.kubectl, self.manifest = kubectl, manifest

    def start(self) -> StandbyPod:
        self.kubectl("create", "-f", "-", input=json.dumps(self.manifest))
        return self

    def stop(self) -> None:
        self.kubectl("delete", "pod", self.manifest["metadata"]["name"], "-n", self.namespace,
                     "--wait=false", check=False)
        self.wait_gone()

    def kill(self) -> None:
        self.kill_containers()
        self.stop()

    def alive(self) -> bool:
        return True
