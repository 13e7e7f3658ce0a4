"""Real nodes for the test cluster: kubelets on containerd + runc, kube-scheduler, kube-proxy,
CNI bridge networking and CoreDNS, beside the control plane of `controlplane.py`.

Each cluster instance gets a network namespace of its own (`kt-<octet>`), joined to this machine
by a veth pair: its containerds, kubelets and kube-proxy run in it, so two clusters on one machine
never share bridges, iptables rules or Service IPs. Addresses (octet O, free when picked):

    10.O.255.1   this machine's end of the veth: the API server (and MLflow) as pods reach them
    10.O.255.2+i node i's InternalIP (the namespace's end)
    10.O.i.0/24  node i's pod network (its own bridge); this machine routes 10.O.0.0/17 to the veth

Each node has its own containerd (root, state, socket under the cluster's workdir), its own
kubelet root dir and cgroup root, so kubelets never see each other's containers.

    nodes = Nodes(control_plane, network, node_bin, workdir, count=2).start()
    nodes.restart_kubelet(0); nodes.restart_containerd(0); nodes.stop()
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import binaries, images
from .controlplane import Component, ControlPlane, free_port, http_get

NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-proxy", "coredns", "crictl", "pause")
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip", "nsenter",
              "buildah", "skopeo", "debootstrap")
CNI_BIN = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
CLUSTER_DNS, DNS_PORT = "10.96.0.10", 1053
GPU_RESOURCE, GPUS_PER_NODE = "nvidia.com/gpu", "8"
CGROUP_V1 = Path("/sys/fs/cgroup")
PAUSE_ALIAS = "registry.k8s.io/pause:3.10"
log = logging.getLogger(__name__)


class NodeError(RuntimeError):
    pass


def build_node_binaries() -> Path:
    """Runs build-node.sh (instant once cached); the bin folder."""
    log = binaries.cache_root() / "node-build.log"
    with open(log, "w") as err:
        proc = subprocess.run(["bash", str(binaries.HERE / "build-node.sh")], stdout=subprocess.PIPE,
                              stderr=err, text=True,
                              env={**os.environ, "KUBETUNE_CACHE": str(binaries.cache_root())})
    if proc.returncode != 0:
        raise NodeError(f"build-node.sh failed ({proc.returncode}); end of {log}:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run a real node, each as a short phrase."""
    out = [t for t in HOST_TOOLS if shutil.which(t) is None]
    out += [f"CNI plugin {CNI_BIN / p}" for p in CNI_PLUGINS if not (CNI_BIN / p).exists()]
    if os.geteuid() != 0:
        out.append("root (containerd, network namespaces, cgroups)")
    if not (CGROUP_V1 / "memory").is_dir():
        out.append(f"cgroup v1 hierarchies under {CGROUP_V1} (the kubelet runs with cgroupfs)")
    return out


def preflight() -> None:
    missing = missing_prerequisites()
    if missing:
        raise NodeError(f"a real node cannot run here: missing {', '.join(missing)} "
                        f"(bash tests/cluster/node-deps.sh installs the packages)")


# -- the cluster's network namespace -----------------------------------------------------------

def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


@dataclass
class Network:
    octet: int = 0

    @property
    def name(self) -> str:
        return f"kt-{self.octet}"

    @property
    def host_ip(self) -> str:
        return f"10.{self.octet}.255.1"

    def node_ip(self, i: int) -> str:
        return f"10.{self.octet}.255.{2 + i}"

    def pod_cidr(self, i: int) -> str:
        return f"10.{self.octet}.{i}.0/24"

    @property
    def cluster_cidr(self) -> str:
        return f"10.{self.octet}.0.0/16"

    def enter(self, *argv: str) -> list[str]:
        """argv run inside the namespace (network only: mounts stay shared with this machine,
        as the kubelet and containerd need)."""
        return ["nsenter", f"--net=/run/netns/{self.name}", *argv]

    def create(self, nodes: int) -> "Network":
        # A lock, so that two clusters starting at once never pick the same octet.
        with open("/run/kubetune-netns.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.octet = self._free_octet()
            sh("ip", "netns", "add", self.name)
        host, peer = f"kt{self.octet}h", f"kt{self.octet}n"
        try:
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", self.name)
            sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", host)
            sh("ip", "link", "set", host, "up")
            inside = lambda *a: sh(*self.enter(*a))  # noqa: E731
            inside("ip", "link", "set", "lo", "up")
            for i in range(nodes):
                inside("ip", "addr", "add", f"{self.node_ip(i)}/24", "dev", peer)
            inside("ip", "link", "set", peer, "up")
            inside("ip", "route", "add", "default", "via", self.host_ip)
            inside("sysctl", "-qw", "net.ipv4.ip_forward=1")
            # Replies of a Service endpoint on the same bridge must pass conntrack to be un-NATed.
            inside("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
            sh("ip", "route", "add", f"10.{self.octet}.0.0/17", "via", self.node_ip(0))
        except BaseException:
            self.delete()
            raise
        return self

    def _free_octet(self) -> int:
        used = sh("ip", "-4", "-o", "addr").stdout + sh("ip", "-4", "route").stdout
        names = sh("ip", "netns", "list").stdout
        for octet in range(200, 250):
            if f" 10.{octet}." not in used and f"kt-{octet}" not in names:
                return octet
        raise NodeError("no free 10.200-249.0.0/16 range for a cluster network")

    def delete(self) -> None:
        if self.octet:
            sh("ip", "netns", "delete", self.name, check=False)   # takes the veth pair with it
            sh("ip", "link", "delete", f"kt{self.octet}h", check=False)


# -- one node: containerd + kubelet ----------------------------------------------------------------

CONTAINERD_CONFIG = """version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # This machine refuses to lower oom_score_adj; runc fails to start a container otherwise.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_unprivileged_ports = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    base_runtime_spec = "{base_spec}"
"""
# What every container gets from this machine's environment when set, as the node agent passes it
# on: the test lanes run many torch processes on 2 cores, one OpenMP thread each (tests/support/lanes.py).
PASSED_ENV = ("OMP_NUM_THREADS",)


@dataclass
class Node:
    index: int
    name: str
    dir: Path
    network: Network
    cgroup_root: str
    containerd: Component | None = None
    kubelet: Component | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", f"--address={self.socket}", "-n", "k8s.io", *args]


@dataclass
class Nodes:
    control_plane: ControlPlane
    network: Network
    bin_dir: Path
    workdir: Path
    count: int = 1
    image_tags: dict[str, str] = field(default_factory=dict)   # name → tag loaded on every node
    nodes: list[Node] = field(default_factory=list)
    scheduler: Component | None = None
    proxy: Component | None = None
    seed: Path | None = None

    def start(self, timeout: float = 120.0) -> "Nodes":
        try:
            with images.store_lock():   # another session may replace the seed meanwhile
                self.seed = containerd_seed(self.image_tags)
                for i in range(self.count):
                    node = self._new_node(i)
                    self.nodes.append(node)
                    clone_root(self.seed, node.dir / "containerd" / "root")
            self._start_scheduler(timeout)
            for node in self.nodes:
                self._start_containerd(node, timeout)
            for node in self.nodes:
                self._start_kubelet(node, timeout)
            for node in self.nodes:
                self._wait_registered(node, timeout)
                self.advertise_gpus(node)
            self._start_proxy(timeout)
            self._start_coredns(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for comp in (self.proxy, *(n.kubelet for n in self.nodes)):
            if comp:
                comp.stop()
        for node in self.nodes:
            self._remove_pod_sandboxes(node)
            if node.containerd:
                node.containerd.stop(grace=10)
            self._unmount_under(node.dir)
            remove_cgroups(node.cgroup_root)
            # Its root is a hard-link clone of the seed: kept (pytest keeps old basetemps), it
            # would pin the layers of an old seed on the disk after the seed itself is gone.
            shutil.rmtree(node.dir / "containerd", ignore_errors=True)
        if self.scheduler:
            self.scheduler.stop()

    def restart_kubelet(self, i: int, timeout: float = 60.0) -> None:
        node = self.nodes[i]
        node.kubelet.stop()
        node.kubelet.spawn()
        node.kubelet.wait_ready(timeout)

    def restart_containerd(self, i: int, timeout: float = 60.0) -> None:
        node = self.nodes[i]
        node.containerd.stop(grace=10)   # the shims and containers live on, as in production
        node.containerd.spawn()
        node.containerd.wait_ready(timeout)

    def kill_main_process(self, namespace: str, pod: str, container: str, sig: int = 9) -> int:
        """Signal a running container's main process (SIGKILL: as the OOM killer would); its pid."""
        for node in self.nodes:
            ids = subprocess.run([*self._crictl(node), "ps", "-q", "--state=running", f"--name=^{container}$",
                                  f"--label=io.kubernetes.pod.name={pod}",
                                  f"--label=io.kubernetes.pod.namespace={namespace}"],
                                 capture_output=True, text=True).stdout.split()
            if ids:
                info = json.loads(subprocess.run([*self._crictl(node), "inspect", ids[0]],
                                                 capture_output=True, text=True, check=True).stdout)
                pid = info["info"]["pid"]
                os.kill(pid, sig)
                return pid
        raise NodeError(f"no running container {container} of pod {namespace}/{pod} on any node")

    def _crictl(self, node: Node) -> list[str]:
        return [str(self.bin_dir / "crictl"), f"--runtime-endpoint=unix://{node.socket}", "--timeout=20s"]

    # -- components ---------------------------------------------------------------------------
    def _component(self, name: str, argv: list[str], ready, in_netns: bool = True) -> Component:
        argv = self.network.enter(*argv) if in_netns else argv
        return Component(name, argv, self.workdir / "logs" / f"{name}.log", ready)

    def _start(self, comp: Component, timeout: float) -> Component:
        comp.spawn()
        comp.wait_ready(timeout)
        return comp

    def _start_scheduler(self, timeout: float) -> None:
        kubeconfig = self.control_plane.client_kubeconfig(self.workdir / "scheduler.kubeconfig",
                                                          "system:kube-scheduler")
        port = free_port()
        argv = [str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'scheduler'}", "--v=1"]
        self.scheduler = self._start(self._component(
            "kube-scheduler", argv, lambda: https_ok(f"https://127.0.0.1:{port}/healthz"), False), timeout)

    def _new_node(self, i: int) -> Node:
        name = f"kubetune-node-{i}"
        folder = self.workdir / f"n{i}"   # short: unix socket paths hold at most 107 bytes
        folder.mkdir(parents=True, exist_ok=True)
        return Node(i, name, folder, self.network, f"/kubetune-{self.network.octet}-{i}")

    def _start_containerd(self, node: Node, timeout: float) -> None:
        (node.dir / "cni").mkdir(exist_ok=True)
        (node.dir / "cni" / "10-bridge.conflist").write_text(json.dumps(
            cni_config(node, self.workdir / "cni-ipam"), indent=1))
        base_spec = node.dir / "base-spec.json"
        base_spec.write_text(json.dumps(base_runtime_spec(
            json.loads(sh("ctr", "oci", "spec").stdout), {k: os.environ[k] for k in PASSED_ENV if k in os.environ})))
        config = node.dir / "containerd.toml"
        config.write_text(CONTAINERD_CONFIG.format(
            root=node.dir / "containerd" / "root", state=node.dir / "containerd" / "state",
            socket=node.socket, pause=PAUSE_ALIAS, cni_bin=CNI_BIN, cni_conf=node.dir / "cni",
            base_spec=base_spec))
        argv = ["containerd", f"--config={config}", "--log-level=warn"]
        ready = lambda: subprocess.run(["ctr", f"--address={node.socket}", "version"],  # noqa: E731
                                       capture_output=True).returncode == 0
        node.containerd = self._start(self._component(f"containerd-{node.index}", argv, ready), timeout)

    def _start_kubelet(self, node: Node, timeout: float) -> None:
        cp = self.control_plane
        server = f"https://{self.network.host_ip}:{cp.api_port}"
        kubeconfig = cp.client_kubeconfig(node.dir / "kubelet.kubeconfig", f"system:node:{node.name}",
                                          "system:nodes", server)
        make_cgroups(node.cgroup_root)
        healthz = free_port()
        config = node.dir / "kubelet.yaml"
        config.write_text(json.dumps(kubelet_config(node, cp.ca.cert, healthz, free_port()), indent=1))
        argv = [str(self.bin_dir / "kubelet"), f"--config={config}", f"--kubeconfig={kubeconfig}",
                f"--root-dir={node.dir / 'kubelet'}", f"--cert-dir={node.dir / 'kubelet-pki'}",
                f"--hostname-override={node.name}", f"--node-ip={self.network.node_ip(node.index)}",
                "--v=1"]
        ready = lambda: http_get(f"http://{self.network.node_ip(node.index)}:{healthz}/healthz")[0] == 200  # noqa: E731
        node.kubelet = self._start(self._component(f"kubelet-{node.index}", argv, ready), timeout)

    def _wait_registered(self, node: Node, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.control_plane.api_get(f"/api/v1/nodes/{node.name}")
            if status == 200:
                conditions = json.loads(body).get("status", {}).get("conditions", [])
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return
            node.kubelet.wait_ready(1)   # fails at once if the kubelet exited
            time.sleep(0.5)
        raise NodeError(f"node {node.name} not Ready after {timeout:.0f}s; see {node.kubelet.log}")

    def advertise_gpus(self, node: Node, timeout: float = 30) -> None:
        """A fake extended resource, so GPU requests schedule; the trainer runs on CPU here.

        Returns once the node's allocatable shows it: the kubelet derives allocatable from
        capacity only at its next status sync, so a run or test started before would not schedule."""
        patch = json.dumps({"status": {"capacity": {GPU_RESOURCE: GPUS_PER_NODE}}})
        self._kubectl("patch", "node", node.name, "--subresource=status", "--type=merge", "-p", patch)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.control_plane.api_get(f"/api/v1/nodes/{node.name}")
            if status == 200 and json.loads(body)["status"].get("allocatable", {}).get(GPU_RESOURCE) == GPUS_PER_NODE:
                return
            time.sleep(0.5)
        raise NodeError(f"node {node.name}'s allocatable has no {GPU_RESOURCE} {timeout:.0f}s after "
                        f"its capacity was patched; see {node.kubelet.log}")

    def _start_proxy(self, timeout: float) -> None:
        cp = self.control_plane
        server = f"https://{self.network.host_ip}:{cp.api_port}"
        kubeconfig = cp.client_kubeconfig(self.workdir / "proxy.kubeconfig", "system:kube-proxy",
                                          None, server)
        healthz = f"{self.network.node_ip(0)}:{free_port()}"
        argv = [str(self.bin_dir / "kube-proxy"), f"--kubeconfig={kubeconfig}", "--proxy-mode=iptables",
                f"--hostname-override={self.nodes[0].name}", f"--cluster-cidr={self.network.cluster_cidr}",
                f"--healthz-bind-address={healthz}", f"--metrics-bind-address=127.0.0.1:{free_port()}",
                "--conntrack-max-per-core=0", "--v=1"]
        ready = lambda: http_get(f"http://{healthz}/healthz")[0] == 200  # noqa: E731
        self.proxy = self._start(self._component("kube-proxy", argv, ready), timeout)

    def _start_coredns(self, timeout: float) -> None:
        self._kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List",
             "items": coredns_objects(self.image_tags["coredns"], self.control_plane.api_port,
                                      self.network.host_ip)}))
        self._kubectl("rollout", "status", "-n", "kube-system", "deployment/coredns",
                      f"--timeout={int(timeout)}s", timeout=timeout + 10)

    def _kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        argv = [str(binaries.kubectl_path()), f"--kubeconfig={self.control_plane.kubeconfig}", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args[:3])} failed: {proc.stderr.strip()}")
        return proc.stdout

    # -- teardown -----------------------------------------------------------------------------
    def _remove_pod_sandboxes(self, node: Node) -> None:
        """Stop every pod of the node, so no container outlives the cluster."""
        if node.containerd is None or node.containerd.proc.poll() is not None:
            return
        crictl = self._crictl(node)
        pods = subprocess.run([*crictl, "pods", "-q"], capture_output=True, text=True).stdout.split()
        for pod in pods:
            subprocess.run([*crictl, "stopp", pod], capture_output=True)
            subprocess.run([*crictl, "rmp", "-f", pod], capture_output=True)

    @staticmethod
    def _unmount_under(folder: Path) -> None:
        prefix = str(folder.resolve()) + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


# -- images: one containerd root holding them, cloned by hard links into every node ----------------

def containerd_seed(tags: dict[str, str], timeout: float = 60.0) -> Path:
    """(Under `images.store_lock()`.) A containerd root with `tags` imported (and pause as PAUSE_ALIAS), one per set of tags
    under ~/.cache/kubetune, cloned by hard links into every node: the trainer image is ~7 GB.
    A new set starts from the last seed, so only layers it lacks are imported and unpacked (after
    a source change, the source layers); images of the old set are then removed from it."""
    key = hashlib.sha256(json.dumps(sorted(tags.values())).encode()).hexdigest()[:12]
    seed = binaries.cache_root() / f"containerd-seed-{key}"
    if (seed / "complete").exists():
        return seed / "root"
    older = [p for p in binaries.cache_root().glob("containerd-seed-*") if (p / "complete").exists()]
    shutil.rmtree(seed, ignore_errors=True)
    if older:
        clone_root(older[0] / "root", seed / "root")
    started = time.monotonic()
    with seed_containerd(seed / "root", timeout) as socket:
        for name, tag in tags.items():
            aliases = (PAUSE_ALIAS,) if name == "pause" else ()
            sent = images.load(tag, socket, seed / "root", aliases)
            log.info("loaded %s: %.1f MB of layers sent", tag, sent / 1e6)
        keep = {*tags.values(), PAUSE_ALIAS}
        ctr = ["ctr", f"--address={socket}", "-n", "k8s.io", "images"]
        stale = [n for n in sh(*ctr, "ls", "-q").stdout.split() if n not in keep]
        if stale:   # --sync: wait until containerd's GC dropped their layers and snapshots
            sh(*ctr, "rm", "--sync", *stale)
    (seed / "complete").write_text(json.dumps(tags))
    log.info("containerd seed %s in %.0fs", seed.name, time.monotonic() - started)
    for old in binaries.cache_root().glob("containerd-seed-*"):   # the disk is precious
        if old != seed:
            shutil.rmtree(old, ignore_errors=True)
    return seed / "root"


@contextlib.contextmanager
def seed_containerd(root: Path, timeout: float):
    """A containerd of its own on `root` (no CRI, nothing runs): its socket."""
    state = Path(tempfile.mkdtemp(prefix="kt-seed-"))
    socket = state / "c.sock"
    config = state / "config.toml"
    config.write_text(f'version = 2\nroot = "{root}"\nstate = "{state / "state"}"\n'
                      f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                      f'[grpc]\n  address = "{socket}"\n')
    proc = subprocess.Popen(["containerd", f"--config={config}", "--log-level=warn"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while subprocess.run(["ctr", f"--address={socket}", "version"], capture_output=True).returncode:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise NodeError(f"containerd for the image seed did not start ({root})")
            time.sleep(0.2)
        yield socket
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(state, ignore_errors=True)


def clone_root(seed: Path, root: Path) -> None:
    """Hard-link copy of a containerd root: blobs and committed layers are immutable, so they can
    be shared; the bolt databases are written to, so each node gets copies of its own."""
    root.parent.mkdir(parents=True, exist_ok=True)
    sh("cp", "-al", str(seed), str(root))
    for db in root.rglob("*.db"):
        data = db.read_bytes()
        db.unlink()
        db.write_bytes(data)


def https_ok(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return http_get(url, ctx)[0] == 200


def base_runtime_spec(default: dict, env: dict[str, str]) -> dict:
    """The container spec containerd's CRI starts from: its default (`ctr oci spec`) as the CRI
    uses it without a base spec (no default seccomp, AppArmor profile or rlimits: the pod's
    securityContext decides those), plus `env`, which the image's and the pod's env override."""
    spec = json.loads(json.dumps(default))
    process = spec.setdefault("process", {})
    process.pop("rlimits", None)
    process["apparmorProfile"] = ""
    spec.get("linux", {}).pop("seccomp", None)
    process["env"] = [*(process.get("env") or []), *(f"{k}={v}" for k, v in env.items())]
    return spec


def cni_config(node: Node, ipam_dir: Path) -> dict:
    return {"cniVersion": "1.0.0", "name": f"kubetune-{node.network.octet}-{node.index}",
            "plugins": [{"type": "bridge", "bridge": f"kt{node.network.octet}b{node.index}",
                         "isGateway": True, "ipMasq": False, "hairpinMode": True,
                         "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                                  "ranges": [[{"subnet": node.network.pod_cidr(node.index)}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}}]}


def kubelet_config(node: Node, ca: Path, healthz_port: int, port: int) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        # This machine mounts cgroup v1 hierarchies; the kubelet refuses v1 unless told.
        "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": node.cgroup_root,
        "address": node.network.node_ip(node.index), "port": port, "readOnlyPort": 0,
        "healthzBindAddress": node.network.node_ip(node.index), "healthzPort": healthz_port,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(ca)}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local", "clusterDNS": [CLUSTER_DNS],
        "failSwapOn": False, "maxPods": 60, "serializeImagePulls": False,
        # Images cannot be pulled again here: never collect them; evict only when truly full.
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "syncFrequency": "10s", "fileCheckFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s", "shutdownGracePeriod": "0s",
        "resolvConf": "/etc/resolv.conf", "localStorageCapacityIsolation": True,
        # Not /var/log/pods: a kubelet deletes the log folders of pods it does not know.
        "podLogsDir": str(node.dir / "pod-logs"),
        "protectKernelDefaults": False, "makeIPTablesUtilChains": False,
    }


def coredns_objects(image: str, api_port: int, api_host: str) -> list[dict]:
    """CoreDNS serving cluster.local from the API server, as kubeadm installs it (host network
    of the cluster namespace, port 1053 behind the kube-dns Service's port 53)."""
    corefile = (f".:{DNS_PORT} {{\n  errors\n  health :18080\n  ready :18181\n"
                "  kubernetes cluster.local in-addr.arpa ip6.arpa {\n    pods insecure\n"
                "    fallthrough in-addr.arpa ip6.arpa\n  }\n  forward . /etc/resolv.conf\n"
                "  cache 5\n  loop\n  reload\n}\n")
    labels = {"k8s-app": "kube-dns"}
    meta = lambda name: {"name": name, "namespace": "kube-system"}  # noqa: E731
    container = {
        "name": "coredns", "image": image, "imagePullPolicy": "Never", "args": ["-conf", "/etc/coredns/Corefile"],
        # The API server as this machine's end of the veth (no kube-proxy needed to find it).
        "env": [{"name": "KUBERNETES_SERVICE_HOST", "value": api_host},
                {"name": "KUBERNETES_SERVICE_PORT", "value": str(api_port)}],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 18181}, "periodSeconds": 2},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True, "runAsNonRoot": True, "runAsUser": 65532},
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("coredns")},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("coredns"), "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {**meta("coredns"), "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "serviceAccountName": "coredns", "hostNetwork": True, "dnsPolicy": "Default",
                      "priorityClassName": "system-cluster-critical",
                      "tolerations": [{"operator": "Exists"}],
                      "containers": [container],
                      "volumes": [{"name": "config", "configMap": {"name": "coredns"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {**meta("kube-dns"), "labels": labels},
         "spec": {"clusterIP": CLUSTER_DNS, "selector": labels,
                  "ports": [{"name": "dns", "port": 53, "targetPort": DNS_PORT, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "targetPort": DNS_PORT, "protocol": "TCP"}]}},
    ]


# -- cgroups (v1, cgroupfs driver): one root per kubelet --------------------------------------------

def cgroup_dirs(root: str) -> list[Path]:
    return [d / root.lstrip("/") for d in CGROUP_V1.iterdir()
            if d.is_dir() and (d / "cgroup.procs").exists() and d.name != "unified"]


def make_cgroups(root: str) -> None:
    for d in cgroup_dirs(root):
        d.mkdir(exist_ok=True)


def remove_cgroups(root: str) -> None:
    """rmdir the kubelet's cgroup tree, leaves first (cgroup folders hold no files to delete)."""
    for top in cgroup_dirs(root):
        if not top.exists():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            top.rmdir()
        except OSError:
            pass
