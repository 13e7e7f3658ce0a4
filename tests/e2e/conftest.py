"""The real operator process against the real control plane, installed as the chart will.

Session fixtures: the CRD (applied with the real kubectl), the operator's least-privilege RBAC
(from `kubetune.rbac`, the one place the rules live), a kubeconfig holding only the operator
ServiceAccount's token, the `site` (where pods run and what they see: `site.py`), and `kubetune
operator` itself as a process. Per test, `inputs` stages the tiny model and the example data in
the test's namespace. Locally the node agent of tests/cluster runs the pods with this interpreter
and a real MLflow server of this machine records the models; against a real cluster the pods run
the trainer image.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubetune.rbac import build_rbac
from tests.support.ports import free_port

from tests.cluster.kubelet_cluster import STORAGE_CLASS
from tests.support.mlflow_server import running_mlflow_server

from .faults import Faults
from .site import REPO, Inputs, Site, SiteUnavailable, kubelet_site, local_site, real_site, stage_inputs

CRD = REPO / "crds" / "trainingruns.kubetune.dev.yaml"
OPERATOR_NAMESPACE = "kubetune-system"
OPERATOR_ACCOUNT = "kubetune-operator"

def pytest_configure(config):
    for plugin in ("tests.cluster.fixtures", "tests.support.mlflow_server"):
        if not config.pluginmanager.has_plugin(plugin):
            config.pluginmanager.import_plugin(plugin)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """A failed e2e test shows what the operator logged, not only what the cluster holds."""
    outcome = yield
    report = outcome.get_result()
    operator = getattr(item, "funcargs", {}).get("operator")
    if report.when == "call" and report.failed and isinstance(operator, OperatorProcess):
        report.sections.append(("kubetune operator log", operator.log_tail()))


def apply(kubectl, objects) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(list(objects)))


@pytest.fixture(scope="session")
def crd(kubectl, wait_for):
    kubectl("apply", "--server-side", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/trainingruns.kubetune.dev", "--timeout=60s")
    return CRD


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster, kubectl, tmp_path_factory) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount: it is not admin."""
    apply(kubectl, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}}])
    apply(kubectl, build_rbac(OPERATOR_NAMESPACE, name=OPERATOR_ACCOUNT))
    token = kubectl("create", "token", OPERATOR_ACCOUNT, "-n", OPERATOR_NAMESPACE,
                    "--duration=6h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == cluster.context)["context"]
    cluster_entry = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [cluster_entry],
        "users": [{"name": OPERATOR_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster_entry["name"],
                                                      "user": OPERATOR_ACCOUNT}}],
    }
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def site(cluster, request, tmp_path_factory) -> Site:
    """Where the pods run and what they see (`site.py`)."""
    if cluster.kubelets:
        uri = request.getfixturevalue("pod_mlflow_server")
        return kubelet_site(cluster.kubelets.images["trainer"], uri, STORAGE_CLASS, cluster.kubelets.volume_for)
    if not cluster.local:
        try:
            return real_site(os.environ)
        except SiteUnavailable as e:
            pytest.skip(str(e))
    storage = tmp_path_factory.mktemp("storage")  # the storage root every pod sees here
    return local_site(storage, request.getfixturevalue("mlflow_server"))


@pytest.fixture(scope="session")
def pod_mlflow_server(cluster, tmp_path_factory):
    """An MLflow server on this machine's address in the cluster network, so pods reach it."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-pods"),
                               host=cluster.kubelets.network.host_ip) as uri:
        yield uri


@pytest.fixture
def inputs(site, kubectl, wait_for, namespace, tiny_model_dir) -> Inputs:
    """The tiny model and the example data, written to the namespace's storage by a Job."""
    return stage_inputs(kubectl, wait_for, site, namespace, tiny_model_dir)


@pytest.fixture
def node_agent(cluster):
    """The local node agent, for tests that act on a pod's processes; they need this machine."""
    if not cluster.local:
        pytest.skip("acts on the pods' processes through the local node agent")
    return cluster.agent


@pytest.fixture
def faults(cluster) -> Faults:
    """Faults on pods that mean the same on the node agent and on real nodes (`faults.py`);
    none act on a remote cluster."""
    if cluster.control_plane is None:
        pytest.skip("injects faults into the pods and nodes of this machine's cluster")
    return Faults(cluster)


@pytest.fixture
def local_s3(cluster, s3_store):
    """The S3 endpoint (moto): a process of this machine, which a real cluster's pods cannot reach."""
    if not cluster.local:
        pytest.skip("the test's S3 endpoint runs on this machine, out of a real cluster's reach")
    return s3_store


def operator_env(kubeconfig: Path, site: Site, metrics_port: int) -> dict:
    return {
        **os.environ,
        **site.operator_env(),
        "KUBECONFIG": str(kubeconfig),
        "POD_NAMESPACE": OPERATOR_NAMESPACE,
        "KUBETUNE_RECONCILE_INTERVAL": "1",  # resync (changes wake a run at once anyway)
        "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "1",  # the tests wait on live checkpoints
        "KUBETUNE_OPERATOR_METRICS_PORT": str(metrics_port),
        "PYTHONUNBUFFERED": "1",
    }


class OperatorProcess:
    def __init__(self, env: dict, log: Path, metrics_port: int):
        self.env, self.log, self.metrics_port, self.process = env, log, metrics_port, None

    def start(self) -> OperatorProcess:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "operator"],
                                            env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=REPO)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """As an OOM kill or a node loss would: no goodbye."""
        self.process.kill()
        self.process.wait()

    def log_tail(self, size: int = 6000) -> str:
        return self.log.read_bytes()[-size:].decode(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="session")
def operator(crd, operator_kubeconfig, site, tmp_path_factory, wait_for):
    port = free_port()
    log = tmp_path_factory.mktemp("operator-log") / "operator.log"
    process = OperatorProcess(operator_env(operator_kubeconfig, site, port), log, port).start()
    try:
        wait_for(lambda: "watching" in process.log_tail() or process.process.poll() is not None,
                 60, "the operator to start")
        if process.process.poll() is not None:
            pytest.fail(f"the operator exited:\n{process.log_tail()}")
        yield process
    finally:
        process.stop()


def trainingrun(name: str, spec: dict) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": name}, "spec": spec}


def wait_phase(kubectl, namespace: str, name: str, phases: set[str], timeout: float, operator=None):
    deadline = time.monotonic() + timeout
    status = {}
    while time.monotonic() < deadline:
        run = kubectl.json("get", "trainingrun", name, "-n", namespace)
        status = run.get("status") or {}
        if status.get("phase") in phases:
            return run
        time.sleep(1)
    tail = operator.log_tail() if operator else ""
    raise TimeoutError(f"{name} never reached {phases}; status: {json.dumps(status)[:3000]}\n"
                       f"operator log:\n{tail}")


# --- helpers for the control and operator-process tests ----------------------------------------

LEASE_NAME = "kubetune-operator"  # the operator's default Lease, in OPERATOR_NAMESPACE
HOLDS_LEASE = re.compile(r"leader election: (\S+) holds lease")


def lease_holder(kubectl) -> str | None:
    lease = kubectl.json("get", "lease", LEASE_NAME, "-n", OPERATOR_NAMESPACE)
    return lease["spec"].get("holderIdentity")


def leader_identity(process: OperatorProcess, since: int = 0) -> str | None:
    """The identity a process logged on winning the Lease after byte `since` of its log."""
    text = process.log.read_bytes()[since:].decode(errors="replace") if process.log.exists() else ""
    found = list(HOLDS_LEASE.finditer(text))
    return found[-1][1] if found and "watching" in text[found[-1].end():] else None


def log_size(process: OperatorProcess) -> int:
    return process.log.stat().st_size if process.log.exists() else 0


def wait_leading(process: OperatorProcess, since: int, wait_for, timeout: float = 60) -> str:
    """Wait until `process` won the Lease and started watching; its identity."""
    def leading():
        assert process.process.poll() is None, f"the operator exited:\n{process.log_tail()}"
        return leader_identity(process, since)
    return wait_for(leading, timeout, "the operator to win the Lease", interval=0.5)


def restart_operator(process: OperatorProcess, wait_for, timeout: float = 60) -> str:
    """SIGKILL the operator and start it again with the same env; its new identity once leading."""
    process.kill()
    since = log_size(process)
    process.start()
    return wait_leading(process, since, wait_for, timeout)
