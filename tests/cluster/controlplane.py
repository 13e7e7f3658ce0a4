"""A real, local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.

Each component is a child process in its own process group with its log in `workdir/logs/`.
Everything listens on 127.0.0.1 on free ports; TLS material is generated per start.

    with ControlPlane(bin_dir) as cp:
        subprocess.run(["kubectl", "--kubeconfig", cp.kubeconfig, "get", "ns"])
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.support.ports import free_port

from . import pki

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"   # first address of SERVICE_CIDR: the `kubernetes` Service
ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTEXT = "kubetune-local"

# The controllers e2e tests rely on. Not pod GC, node lifecycle or taint eviction: they would
# judge the test node agent by kubelet standards and evict or delete its pods.
CONTROLLERS = (
    "job-controller", "cronjob-controller", "deployment-controller", "replicaset-controller",
    "garbage-collector-controller", "namespace-controller", "serviceaccount-controller",
    "serviceaccount-token-controller", "ttl-after-finished-controller",
    "root-ca-certificate-publisher-controller", "clusterrole-aggregation-controller",
    # PVCs and PVs get protection finalizers at admission; without these nothing removes them
    # and namespace deletion hangs.
    "persistentvolumeclaim-protection-controller", "persistentvolume-protection-controller",
)
# With real kubelets (node.py) also what they rely on: Service endpoints (CoreDNS, kube-proxy),
# PV binding, garbage collection of pods whose node went away, and node lifecycle (it lifts
# the not-ready taint a kubelet registers with, or nothing schedules).
NODE_CONTROLLERS = ("endpoints-controller", "endpointslice-controller", "node-lifecycle-controller",
                    "persistentvolume-binder-controller", "pod-garbage-collector-controller")


class ControlPlaneError(RuntimeError):
    pass


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def kubeconfig(server: str, ca: Path, client: pki.KeyPair, user: str, context: str = CONTEXT) -> dict:
    """A kubeconfig with the credentials embedded, so it can be copied anywhere."""
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": context, "cluster": {"server": server,
                                                   "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(client.cert),
                                          "client-key-data": b64(client.key)}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": user}}],
    }


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    ready: Callable[[], bool]
    proc: subprocess.Popen | None = None

    def spawn(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ControlPlaneError(f"{self.name} exited with {self.proc.returncode}; "
                                        f"log tail ({self.log}):\n{log_tail(self.log)}")
            if self.ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{self.name} not ready after {timeout:.0f}s; "
                                f"log tail ({self.log}):\n{log_tail(self.log)}")

    def stop(self, grace: float = 3.0) -> None:
        # Short grace: the data is thrown away, and kube-apiserver can linger for many seconds
        # after its graceful shutdown has finished.
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


@dataclass
class ControlPlane:
    bin_dir: Path
    workdir: Path | None = None
    etcd_port: int = 0
    api_port: int = 0
    components: dict[str, Component] = field(default_factory=dict)
    # 127.0.0.1 unless pods must reach the API server (real nodes): then an address of this
    # machine they route to, and the API server listens on every interface.
    advertise_address: str = "127.0.0.1"
    controllers: tuple[str, ...] = CONTROLLERS
    kcm_args: tuple[str, ...] = ()  # more kube-controller-manager flags (the load bench's QPS)
    _own_workdir: bool = False

    # -- public API -------------------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def start(self, timeout: float = 60.0) -> "ControlPlane":
        if self.workdir is None:
            self.workdir, self._own_workdir = Path(tempfile.mkdtemp(prefix="kubetune-cp-")), True
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._make_pki()
            self._start("etcd", self._etcd_argv, self._etcd_ready, timeout)
            self._start("kube-apiserver", self._apiserver_argv, self._api_ready, timeout)
            self._write_kubeconfigs()
            self._start("kube-controller-manager", self._kcm_argv, self._kcm_ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for comp in reversed(list(self.components.values())):
            comp.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Kill a component and start it again with the same ports and data (fault injection)."""
        comp = self.components[name]
        comp.stop()
        comp.spawn()
        comp.wait_ready(timeout)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- startup ----------------------------------------------------------------------------
    def _start(self, name: str, argv: Callable[[], list[str]], ready: Callable[[], bool],
               timeout: float) -> None:
        # Ports are picked just before the spawn; another process may still grab one in
        # between (other clusters run in parallel on this machine), so retry on that alone.
        for attempt in range(3):
            comp = Component(name, argv(), self.logs / f"{name}.log", ready)
            self.components[name] = comp
            comp.spawn()
            try:
                comp.wait_ready(timeout)
                return
            except ControlPlaneError:
                comp.stop()
                if attempt == 2 or "address already in use" not in log_tail(comp.log):
                    raise

    def _make_pki(self) -> None:
        d = self.workdir / "pki"
        d.mkdir(exist_ok=True)
        self.ca = pki.make_ca(d)
        self.serving = pki.issue(self.ca, d, "apiserver", "kube-apiserver",
                                 dns=("localhost", "kubernetes", "kubernetes.default",
                                      "kubernetes.default.svc",
                                      "kubernetes.default.svc.cluster.local"),
                                 ips=tuple(dict.fromkeys(("127.0.0.1", SERVICE_IP, self.advertise_address))))
        self.admin = pki.issue(self.ca, d, "admin", "kubetune-admin", organization="system:masters")
        self.kcm_client = pki.issue(self.ca, d, "kcm", "system:kube-controller-manager")
        self.kubelet_client = pki.issue(self.ca, d, "apiserver-kubelet-client",
                                        "kube-apiserver-kubelet-client",
                                        organization="kubeadm:cluster-admins")
        self.sa_key = pki.make_signing_key(d)

    def _etcd_argv(self) -> list[str]:
        self.etcd_port, peer = free_port(), free_port()
        client, peer_url = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{peer}"
        return [str(self.bin_dir / "etcd"), "--name=kt", f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kt={peer_url}",
                "--unsafe-no-fsync",   # test data: durability is not worth the disk latency
                "--heartbeat-interval=100", "--election-timeout=500",   # a lone member: elect fast
                "--log-level=warn"]

    def _apiserver_argv(self) -> list[str]:
        self.api_port = free_port()
        return [str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--bind-address={'127.0.0.1' if self.advertise_address == '127.0.0.1' else '0.0.0.0'}",
                f"--advertise-address={self.advertise_address}",
                f"--secure-port={self.api_port}", f"--cert-dir={self.workdir / 'apiserver'}",
                f"--tls-cert-file={self.serving.cert}", f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.ca.cert}",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={self.sa_key.cert}",
                f"--service-account-signing-key-file={self.sa_key.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                # Default plugins (PodSecurity, ServiceAccount, ...) plus the Node authorizer's.
                "--enable-admission-plugins=NodeRestriction",
                # Privileged pods are allowed cluster-wide, so Pod Security is what refuses them.
                "--allow-privileged=true",
                f"--kubelet-client-certificate={self.kubelet_client.cert}",
                f"--kubelet-client-key={self.kubelet_client.key}",
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false", "--v=1"]

    def _write_kubeconfigs(self) -> None:
        for path, client, user in ((self.kubeconfig, self.admin, "kubetune-admin"),
                                   (self.workdir / "kcm.kubeconfig", self.kcm_client,
                                    "system:kube-controller-manager")):
            path.write_text(json.dumps(kubeconfig(self.server, self.ca.cert, client, user), indent=1))
            path.chmod(0o600)

    def client_kubeconfig(self, path: Path, user: str, organization: str | None = None,
                          server: str | None = None) -> Path:
        """A kubeconfig for a client certificate of `user` (in group `organization`)."""
        stem = user.replace(":", "-")
        client = pki.issue(self.ca, self.workdir / "pki", stem, user, organization=organization)
        config = kubeconfig(server or self.server, self.ca.cert, client, user)
        path.write_text(json.dumps(config, indent=1))
        path.chmod(0o600)
        return path

    def _kcm_argv(self) -> list[str]:
        return [str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.workdir / 'kcm.kubeconfig'}",
                "--secure-port=0",   # no metrics/health endpoint: readiness is observed instead
                "--leader-elect=false",
                f"--controllers={','.join(self.controllers)}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.sa_key.key}",
                f"--root-ca-file={self.ca.cert}",
                "--cluster-name=kubetune", "--v=1", *self.kcm_args]

    # -- readiness probes -------------------------------------------------------------------
    def _etcd_ready(self) -> bool:
        status, body = http_get(f"http://127.0.0.1:{self.etcd_port}/health")
        return status == 200 and b'"true"' in body

    def _api_ready(self) -> bool:
        return self.api_get("/readyz")[0] == 200

    def _kcm_ready(self) -> bool:
        # The serviceaccount controller creating `default` proves the controllers sync.
        return self.api_get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

    def api_get(self, path: str) -> tuple[int, bytes]:
        """GET on the API server as the admin; (0, b"") while it does not answer."""
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        ctx.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return http_get(self.server + path, ctx)


def http_get(url: str, ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ssl.SSLError):
        return 0, b""
