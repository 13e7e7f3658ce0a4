"""pytest plugin: a real Kubernetes API for the e2e tests.

Load it with `pytest_plugins = ["tests.cluster.fixtures"]` in the root conftest (or import its
fixtures). Fixtures:

- `cluster` (session): a `Cluster`. By default a local control plane (etcd, kube-apiserver,
  kube-controller-manager built from Go modules) on real nodes (`kubelet_cluster.py`: kubelets on
  containerd, kube-scheduler, kube-proxy, CoreDNS, the project's images; no fallback: if they
  cannot start, the session fails saying what is missing); with KUBETUNE_E2E_NODE=agent, the
  same control plane with the node agent (`node_agent.py`) instead, as the control-plane
  benchmark runs it. With
  KUBETUNE_E2E_KUBECONFIG set, that cluster instead (no agent); its current context must be
  listed in KUBETUNE_E2E_CONTEXTS (comma-separated) or be a kind-* context.
- `kubectl` (session): `kubectl(*args, input=None, check=True, timeout=120)` runs the real
  kubectl with the cluster's kubeconfig and returns the CompletedProcess (text); on failure it
  raises `KubectlError`, whose message holds stderr. `kubectl.json(*args)` parses `-o json`.
- `helm` (session): the path of the real helm binary.
- `namespace`: a fresh namespace with Pod Security `restricted` enforced, deleted afterwards.
- `wait_for` (session): `wait_for(predicate, timeout=30, what="...", interval=0.2)` polls until
  the predicate returns something truthy and returns it; raises TimeoutError naming `what` and
  the last value or exception (an AssertionError in the predicate fails at once).

When a test that uses `namespace` fails, its report gets the namespace's pods, jobs, events and,
locally, the pods' container logs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from kubernetes import client, config

from . import binaries
from .controlplane import ControlPlane, ControlPlaneError
from .images import ImageError
from .kubelet_cluster import KubeletCluster
from .node import NodeError
from .node_agent import NodeAgent

ENV_KUBECONFIG, ENV_CONTEXTS = "KUBETUNE_E2E_KUBECONFIG", "KUBETUNE_E2E_CONTEXTS"
ENV_NODE = "KUBETUNE_E2E_NODE"   # "kubelet" (the default) or "agent"
NODE_KINDS = ("kubelet", "agent")
NODES = 2   # the 2-node training test crosses a real pod network


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr.strip()}"


@dataclass
class Kubectl:
    binary: Path
    kubeconfig: Path

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, ["kubectl", *args], proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)


@dataclass
class Cluster:
    kubeconfig: Path
    context: str
    kubectl_bin: Path
    helm_bin: Path
    control_plane: ControlPlane | None = None   # None against a real cluster
    agent: NodeAgent | None = None
    startup_seconds: float = 0.0
    kubelets: KubeletCluster | None = None   # real nodes of this machine

    @property
    def local(self) -> bool:
        return self.agent is not None

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def pod_logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """Container output of a pod that ran here ("" for a remote cluster)."""
        if self.agent:
            return self.agent.logs(namespace, pod, container)
        if self.kubelets:
            args = ["logs", pod, "-n", namespace, "--all-containers" if container is None else f"-c={container}"]
            return Kubectl(self.kubectl_bin, self.kubeconfig)(*args, check=False, timeout=30).stdout
        return ""


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy and return that. Exceptions count as
    "not yet" (the object may not exist yet), except AssertionError: a failed assert inside the
    predicate means it never will, so it fails at once."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def real_cluster_context(kubeconfig: Path, allowed: str) -> str:
    """The kubeconfig's current context, if the user allowed tests to run against it."""
    context = (yaml.safe_load(kubeconfig.read_text()) or {}).get("current-context", "")
    names = {c.strip() for c in allowed.split(",") if c.strip()}
    if context in names or context.startswith("kind-"):
        return context
    raise pytest.UsageError(f"refusing to run e2e tests against context {context!r} of {kubeconfig}: "
                            f"name it in {ENV_CONTEXTS} (or use a kind-* cluster)")


def start_local_cluster(workdir: Path) -> Cluster:
    if shutil.which("go") is None and not os.environ.get("KUBETUNE_CLUSTER_BIN"):
        pytest.skip("no Go toolchain to build the control plane and no KUBETUNE_CLUSTER_BIN")
    bin_dir = binaries.control_plane_bin_dir()
    tools = binaries.tools_dir()
    node = os.environ.get(ENV_NODE) or NODE_KINDS[0]
    if node not in NODE_KINDS:
        pytest.fail(f"{ENV_NODE}={node!r}: use one of {', '.join(NODE_KINDS)}", pytrace=False)
    if node == "kubelet":
        return start_kubelet_cluster(workdir, tools)
    started = time.monotonic()   # the one-time build is not counted as startup
    cp = ControlPlane(bin_dir, workdir / "control-plane").start()
    try:
        agent = NodeAgent(cp.kubeconfig, workdir / "node").start()
    except BaseException:
        cp.stop()
        raise
    return Cluster(cp.kubeconfig, "kubetune-local", tools / "kubectl", tools / "helm", cp, agent,
                   time.monotonic() - started)


def start_kubelet_cluster(workdir: Path, tools: Path) -> Cluster:
    started = time.monotonic()   # includes image and node builds when not cached
    try:
        kubelets = KubeletCluster(workdir, NODES).start()
    except (NodeError, ImageError, ControlPlaneError, binaries.BinariesError) as e:
        # No fallback to the node agent: say what is missing, once, without a traceback.
        pytest.fail(f"real nodes did not start: {e}", pytrace=False)
    return Cluster(kubelets.kubeconfig, "kubetune-local", tools / "kubectl", tools / "helm",
                   kubelets.control_plane, startup_seconds=time.monotonic() - started, kubelets=kubelets)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    real = os.environ.get(ENV_KUBECONFIG)
    if real:
        path = Path(real).expanduser()
        context = real_cluster_context(path, os.environ.get(ENV_CONTEXTS, ""))
        tools = binaries.tools_dir()
        yield Cluster(path, context, tools / "kubectl", tools / "helm")
        return
    # pytest keeps the last few basetemps, so logs of a failed session stay for a look.
    local = start_local_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield local
    finally:
        if local.kubelets:
            local.kubelets.stop()
        else:
            local.agent.stop()
            local.control_plane.stop()


@pytest.fixture(scope="session")
def kubectl(cluster: Cluster) -> Kubectl:
    return Kubectl(cluster.kubectl_bin, cluster.kubeconfig)


@pytest.fixture(scope="session")
def helm(cluster: Cluster) -> Path:
    return cluster.helm_bin


@pytest.fixture(name="wait_for", scope="session")
def wait_for_fixture() -> Callable[..., Any]:
    return wait_for


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest):
    name = namespace_name(request.node.name)
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": name, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted", "kubetune.dev/e2e": "true"}}})
        # Pods are refused until the serviceaccount controller has made `default`.
        wait_for(lambda: core.read_namespaced_service_account("default", name), 30,
                 f"serviceaccount default in {name}")
        yield name
        core.delete_namespace(name, propagation_policy="Background")
        if cluster.kubelets:   # the namespace's local PersistentVolumes (volume_for)
            client.CoreV1Api(api).delete_collection_persistent_volume(
                label_selector=f"kubetune.dev/namespace={name}")


def namespace_name(test_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"kt-{stem}-{secrets.token_hex(3)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    if report.when == "call" and report.failed and "namespace" in funcargs and "cluster" in funcargs:
        report.sections.append(("kubetune cluster", diagnostics(funcargs["cluster"], funcargs["namespace"])))


def diagnostics(cluster: Cluster, namespace: str) -> str:
    kubectl = Kubectl(cluster.kubectl_bin, cluster.kubeconfig)
    parts = []
    for args in (("get", "pods,jobs,services", "-o", "wide"), ("get", "events", "--sort-by=.lastTimestamp")):
        proc = kubectl(*args, "-n", namespace, check=False, timeout=20)
        parts.append(f"$ kubectl {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    if cluster.kubelets:
        pods = kubectl("get", "pods", "-n", namespace, "-o", "name", check=False, timeout=20).stdout.split()
        for pod in pods:
            parts.append(f"--- logs of {pod}:\n{cluster.pod_logs(namespace, pod.split('/')[-1])[-4000:]}")
    if cluster.agent:
        for run in list(cluster.agent.runs.values()):
            meta = run.pod["metadata"]
            if meta["namespace"] == namespace:
                parts.append(f"--- logs of pod {meta['name']} ({run.dir}):\n"
                             f"{cluster.pod_logs(namespace, meta['name'])[-4000:]}")
    return "\n".join(parts)
