"""A whole local cluster on real nodes: control plane + kubelets on containerd, with the
project's images built and loaded. Used by the e2e fixtures and by `make cluster`.

    with KubeletCluster(workdir, nodes=2) as kc:
        kc.kubeconfig, kc.images["trainer"], kc.nodes.restart_kubelet(0)

    python -m tests.cluster.kubelet_cluster up|down [--nodes N]   # make cluster / cluster-down
    python -m tests.cluster.kubelet_cluster images                # build images + seed (make node-images)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import binaries, images
from .controlplane import CONTROLLERS, NODE_CONTROLLERS, ControlPlane
from .node import Network, Nodes, NodeError, build_node_binaries, containerd_seed, preflight

STORAGE_CLASS = "kubetune-local"
log = logging.getLogger(__name__)


def build_images(node_bin: Path) -> dict[str, str]:
    """Every image the cluster runs, built (or found by content hash); name → tag."""
    with images.store_lock():
        images.ensure_base()
        tags = {}
        for image in (images.binary_image("pause", node_bin / "pause", ["/pause"]),
                      images.binary_image("coredns", node_bin / "coredns", ["/coredns"]),
                      images.operator_image(), images.trainer_image()):
            started = time.monotonic()
            tags[image.name] = images.build(image)
            log.info("image %s: %s (%.0fs)", image.name, tags[image.name], time.monotonic() - started)
    return tags


@dataclass
class KubeletCluster:
    workdir: Path
    node_count: int = 1
    control_plane: ControlPlane | None = None
    network: Network = field(default_factory=Network)
    nodes: Nodes | None = None
    images: dict[str, str] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def start(self) -> "KubeletCluster":
        preflight()
        cp_bin, node_bin = binaries.control_plane_bin_dir(), build_node_binaries()
        self.images = build_images(node_bin)
        try:
            self.network.create(self.node_count)
            self.control_plane = ControlPlane(cp_bin, self.workdir / "control-plane",
                                              advertise_address=self.network.host_ip,
                                              controllers=CONTROLLERS + NODE_CONTROLLERS).start()
            self.nodes = Nodes(self.control_plane, self.network, node_bin, self.workdir,
                               self.node_count, self.images).start()
            self._storage_class()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.nodes:
            self.nodes.stop()
        if self.control_plane:
            self.control_plane.stop()
        self.network.delete()

    def __enter__(self) -> "KubeletCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- storage ------------------------------------------------------------------------------
    def _storage_class(self) -> None:
        self.nodes._kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {
                "name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate",
            "reclaimPolicy": "Retain"}))

    def volume_for(self, namespace: str, claim: str, size: str = "2Gi") -> dict:
        """A local PersistentVolume pre-bound to `namespace/claim`, a folder of this machine that
        every node (they all live here) mounts; the kubelet applies the pod's fsGroup to it."""
        folder = self.workdir / "volumes" / namespace / claim
        folder.mkdir(parents=True, exist_ok=True)
        names = [n.name for n in self.nodes.nodes]
        return {"apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"{namespace}-{claim}"[:253],
                             "labels": {"kubetune.dev/namespace": namespace}},
                "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                         "persistentVolumeReclaimPolicy": "Retain", "storageClassName": STORAGE_CLASS,
                         "claimRef": {"namespace": namespace, "name": claim},
                         "local": {"path": str(folder)},
                         "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                             {"key": "kubernetes.io/hostname", "operator": "In", "values": names}]}]}}}}


# -- make cluster / make cluster-down -----------------------------------------------------------

OPERATOR_NAMESPACE, RELEASE = "kubetune-system", "kubetune"
CHART = binaries.HERE.parents[1] / "charts" / "kubetune"


def operator_values(image: str, trainer_image: str) -> dict:
    """The chart's values for this cluster: the images built here (never pulled), and GPU runs
    trained on CPU (the nodes' `nvidia.com/gpu` is a stand-in)."""
    repository, tag = image.rsplit(":", 1)
    return {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
            "defaults": {"trainerImage": trainer_image, "trainerPullPolicy": "Never"},
            "extraEnv": [{"name": "KUBETUNE_CPU_FALLBACK", "value": "true"}]}


def operator_namespace() -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": OPERATOR_NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}


def install_operator(cluster: KubeletCluster, values: dict, timeout: int = 180) -> None:
    """`helm install --wait` of the chart (its CRD unless there, RBAC, Deployment) into the
    operator's namespace, where Pod Security `restricted` is enforced."""
    cluster.nodes._kubectl("apply", "-f", "-", input=json.dumps(operator_namespace()))
    path = cluster.workdir / "operator-values.json"   # JSON is YAML
    path.write_text(json.dumps(values))
    proc = subprocess.run([str(binaries.helm_path()), f"--kubeconfig={cluster.kubeconfig}", "-n", OPERATOR_NAMESPACE,
                           "install", RELEASE, str(CHART), "-f", str(path), "--wait", f"--timeout={timeout}s"],
                          capture_output=True, text=True, timeout=timeout + 30)
    if proc.returncode != 0:
        raise NodeError(f"helm install of the operator failed: {(proc.stderr or proc.stdout).strip()}")


def deploy_operator(cluster: KubeletCluster) -> None:
    install_operator(cluster, operator_values(cluster.images["operator"], cluster.images["trainer"]))


def state_dir() -> Path:
    return binaries.cache_root() / "make-cluster"


def up(node_count: int) -> int:
    state = state_dir()
    if (state / "pid").exists():
        print(f"a cluster is already up (pid {(state / 'pid').read_text().strip()}); make cluster-down first",
              file=sys.stderr)
        return 1
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    pid = os.fork()
    if pid == 0:   # the cluster's keeper: starts it, holds it until SIGTERM, stops it
        os.setsid()
        with open(state / "cluster.log", "ab", buffering=0) as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        code = keep(state, node_count)
        os._exit(code)
    while not (state / "ready").exists():
        if os.waitpid(pid, os.WNOHANG)[0]:
            print(f"the cluster did not start; see {state / 'cluster.log'}:\n"
                  + (state / "cluster.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            shutil.rmtree(state, ignore_errors=True)
            return 1
        time.sleep(1)
    print(f"export KUBECONFIG={(state / 'ready').read_text().strip()}")
    return 0


def keep(state: Path, node_count: int) -> int:
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    (state / "pid").write_text(str(os.getpid()))
    cluster = KubeletCluster(state / "work", node_count)
    try:
        cluster.start()
        deploy_operator(cluster)
        (state / "ready").write_text(str(cluster.kubeconfig))
        while not stopping:
            time.sleep(0.5)
        return 0
    except (NodeError, images.ImageError, binaries.BinariesError, OSError) as e:
        log.error("%s", e)
        return 1
    finally:
        cluster.stop()
        (state / "pid").unlink(missing_ok=True)


def down() -> int:
    pid_file = state_dir() / "pid"
    if not pid_file.exists():
        print("no cluster is up")
        return 0
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink()
        return 0
    while pid_file.exists():
        time.sleep(0.5)
    print("cluster stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.kubelet_cluster")
    parser.add_argument("action", choices=("up", "down", "images"))
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    if args.action == "images":   # the slow one-time part, outside any test's timeout
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        tags = build_images(build_node_binaries())
        with images.store_lock():
            print(containerd_seed(tags))
        return 0
    return up(args.nodes) if args.action == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
