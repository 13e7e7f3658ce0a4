"""Faults on a run's pods that mean the same on every site of this machine (the `faults` fixture).

On the node agent a container is a process group of this machine; on real nodes it is a
container of a kubelet's containerd (`tests/cluster/node.py`). `kill_trainer` is what an OOM kill
or a crashing trainer looks like on either: the container's main process dies by SIGKILL, no
goodbye, and the pod fails with exit code 137. Node faults (kubelet, containerd) exist only where
there are real nodes.
"""

from __future__ import annotations

import os
import signal

from tests.cluster.node import NodeError

TRAIN_CONTAINER = "train"


class Faults:
    def __init__(self, cluster):
        self.cluster = cluster

    @property
    def real_nodes(self):
        """`Nodes` of the real kubelets (None on the node agent)."""
        return self.cluster.kubelets.nodes if self.cluster.kubelets else None

    def kill_trainer(self, namespace: str, pod: str) -> int | None:
        """SIGKILL the training container's main process; its pid, None while it is not running
        (so `wait_for(lambda: faults.kill_trainer(ns, pod), ...)` kills it once it runs)."""
        if self.cluster.agent:
            run = self.cluster.agent.find(namespace, pod)
            process = run.procs.get(TRAIN_CONTAINER) if run else None
            if process is None or process.poll() is not None:
                return None
            # Its whole group, as a container's PID namespace dies with its first process.
            # (One-node runs: torchrun starts its workers in sessions of their own.)
            os.killpg(process.pid, signal.SIGKILL)
            return process.pid
        try:
            return self.real_nodes.kill_main_process(namespace, pod, TRAIN_CONTAINER)
        except NodeError:
            return None

    def node_of(self, pod: dict) -> int:
        """The index of the real node a pod runs on."""
        names = [node.name for node in self.real_nodes.nodes]
        return names.index(pod["spec"]["nodeName"])

    def restart_kubelet(self, pod: dict) -> None:
        self.real_nodes.restart_kubelet(self.node_of(pod))

    def restart_containerd(self, pod: dict) -> None:
        self.real_nodes.restart_containerd(self.node_of(pod))
