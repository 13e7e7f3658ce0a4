"""The real operator against the real control plane.

Session fixtures: the CRD (applied with the real kubectl), the `site` (where pods run and what
they see: `site.py`), and the operator. On real nodes of this machine it is a pod of its image,
installed by the Helm chart (`operator_pods.py`); elsewhere `kubetune operator` runs as a process
of this machine with the operator's least-privilege RBAC (from `kubetune.rbac`, the one place the
rules live) and a kubeconfig holding only its ServiceAccount's token. Per test, `inputs` stages
the tiny model and the example data in the test's namespace. Locally the node agent of
tests/cluster runs the pods with this interpreter and a real MLflow server of this machine records
the models; on real nodes and against a real cluster the pods run the trainer image.
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

from tests.cluster.kubelet_cluster import (
    OPERATOR_NAMESPACE,
    RELEASE,
    STORAGE_CLASS,
    install_operator,
    operator_namespace,
)
from tests.cluster.node import NodeError
from tests.support.mlflow_server import running_mlflow_server

from .faults import Faults
from .operator_pods import ChartOperator, OperatorPods
from .site import (
    E2E_INTERVALS,
    REPO,
    Inputs,
    Site,
    SiteUnavailable,
    chart_values,
    kubelet_site,
    local_site,
    real_site,
    stage_inputs,
)

CRD = REPO / "crds" / "trainingruns.kubetune.dev.yaml"
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
    if report.when == "call" and report.failed and isinstance(operator, (OperatorProcess, OperatorPods)):
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
    apply(kubectl, [operator_namespace()])
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
def faults(cluster) -> Faults:
    """Faults on pods that mean the same on the node agent and on real nodes (`faults.py`);
    none act on a remote cluster."""
    if cluster.control_plane is None:
        pytest.skip("injects faults into the pods and nodes of this machine's cluster")
    return Faults(cluster)


@pytest.fixture
def local_s3(cluster, s3_store):
    """The S3 endpoint (moto): a process of this machine, which a real cluster's pods cannot reach.
    On this machine's kubelets they could, but a run stored on S3 mounts no volume, and the tiny
    model the tests stage lives on the namespace's volume (no hub to fetch one from here)."""
    if cluster.kubelets:
        pytest.skip("a run stored on S3 mounts no volume, and the staged tiny model lives on one")
    if not cluster.local:
        pytest.skip("the test's S3 endpoint runs on this machine, out of a real cluster's reach")
    return s3_store


def operator_env(kubeconfig: Path, site: Site, metrics_port: int) -> dict:
    return {
        **os.environ,
        **site.operator_env(),
        "KUBECONFIG": str(kubeconfig),
        "POD_NAMESPACE": OPERATOR_NAMESPACE,
        **E2E_INTERVALS,
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

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def standby(self, folder: Path) -> OperatorProcess:
        """A second replica: the same command and env, its own metrics port and log."""
        port = free_port()
        return OperatorProcess({**self.env, "KUBETUNE_OPERATOR_METRICS_PORT": str(port)},
                               folder / "standby.log", port)


@pytest.fixture(scope="session")
def operator(crd, site, cluster, kubectl, request, tmp_path_factory, wait_for):
    folder = tmp_path_factory.mktemp("operator")
    if cluster.kubelets:
        running = chart_operator(cluster, kubectl, site, folder)
    else:
        port = free_port()
        kubeconfig = request.getfixturevalue("operator_kubeconfig")
        running = OperatorProcess(operator_env(kubeconfig, site, port), folder / "operator.log", port).start()
    try:
        wait_for(lambda: "watching" in running.log_tail() or not running.alive(), 120, "the operator to start")
        if not running.alive():
            pytest.fail(f"the operator exited:\n{running.log_tail()}")
        yield running
    finally:
        if isinstance(running, OperatorProcess):
            running.stop()
        else:   # its pods go with the session's cluster
            running.close()


def chart_operator(cluster, kubectl, site: Site, folder: Path) -> ChartOperator:
    """`helm install` of the chart with the operator image built here, cluster-wide (the tests'
    namespaces come and go), pointed at the site."""
    # No aggregation into `edit`/`view`: the Helm test checks that its own release's go with it.
    values = {**chart_values(site, cluster.kubelets.images["operator"]), "userRoles": {"aggregate": False}}
    try:
        install_operator(cluster.kubelets, values)
    except NodeError as e:
        pods = kubectl("get", "pods,events", "-n", OPERATOR_NAMESPACE, "-o", "wide", check=False).stdout
        pytest.fail(f"{e}\n{pods}", pytrace=False)
    return ChartOperator(cluster, kubectl, OPERATOR_NAMESPACE, RELEASE,  # its Deployment: the release name
                         f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator",
                         folder / "operator.log")


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
        assert process.alive(), f"the operator exited:\n{process.log_tail()}"
        return leader_identity(process, since)
    return wait_for(leading, timeout, "the operator to win the Lease", interval=0.5)


def restart_operator(process: OperatorProcess, wait_for, timeout: float = 60) -> str:
    """SIGKILL the operator and start it again with the same env; its new identity once leading."""
    process.kill()
    since = log_size(process)
    process.start()
    return wait_leading(process, since, wait_for, timeout)
