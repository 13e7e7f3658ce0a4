"""Each error a user can cause against a real API server reaches them as its own documented type,
never as an ApiException: a ServiceAccount that lacks rights, credentials the server rejects, a
resource group the server does not serve, a run that does not exist, a name taken twice. The CLI
leaves each with its documented exit code. Also: in a pod without a kubeconfig, the SDK talks with
its ServiceAccount in its namespace, here and, on real nodes, in a pod of the trainer image. (No
operator runs: none of this needs one.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune import foundation_model as fm
from kubetune.foundation_model import client

from .site import restricted_job, run_tool

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
SPEC = {"model": "Qwen/Qwen2.5-0.5B", "train_data_path": "/data/train.jsonl", "register_to": "main.ml"}


def kubeconfig_for(cluster, kubectl, tmp_path: Path, namespace: str, account: str | None) -> Path:
    """A kubeconfig whose context's namespace is `namespace`: the admin's, or a ServiceAccount's token."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == cluster.context)["context"]
    cluster_entry = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    user = next(u for u in admin["users"] if u["name"] == context["user"])
    if account:
        kubectl("create", "serviceaccount", account, "-n", namespace)
        token = kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
        user = {"name": account, "user": {"token": token}}
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "here",
              "clusters": [cluster_entry], "users": [user],
              "contexts": [{"name": "here", "context": {"cluster": cluster_entry["name"], "user": user["name"],
                                                        "namespace": namespace}}]}
    path = tmp_path / f"kubeconfig-{account or 'admin'}"
    path.write_text(yaml.safe_dump(config))
    return path


def kubetune(kubeconfig: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *argv], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "ApiException" not in result.stderr, result.stderr


def test_no_permission_is_permission_denied_naming_what_to_ask_for(
        crd, cluster, kubectl, namespace, tmp_path, monkeypatch):
    kubeconfig = kubeconfig_for(cluster, kubectl, tmp_path, namespace, "nobody")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(fm.PermissionDeniedError) as listing:
        fm.list()
    message = str(listing.value)
    assert "cannot list resource" in message and namespace in message
    assert "ask a cluster admin" in message and "trainingruns.kubetune.dev" in message
    with pytest.raises(fm.PermissionDeniedError, match="cannot create resource"):
        fm.create(**SPEC)
    result = kubetune(kubeconfig, "list")
    assert result.returncode == 5 and "ask a cluster admin" in result.stderr
    no_traceback(result)


def test_rejected_credentials_are_permission_denied_too(crd, cluster, kubectl, namespace, tmp_path, monkeypatch):
    kubeconfig = kubeconfig_for(cluster, kubectl, tmp_path, namespace, None)
    config = yaml.safe_load(kubeconfig.read_text())
    config["users"] = [{"name": config["users"][0]["name"], "user": {"token": "not-a-token"}}]
    kubeconfig.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(fm.PermissionDeniedError, match="rejected the credentials"):
        fm.get("anything")


def test_a_server_without_the_crd_is_crd_not_installed(cluster, kubectl, namespace, tmp_path, monkeypatch):
    """The kubetune.dev CRD may be installed by other tests of this session; a group the server
    does not serve gets the very answer a server without the CRD gives (404, no Status)."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig_for(cluster, kubectl, tmp_path, namespace, None)))
    with client.connect(group="absent.kubetune.dev") as runs:
        with pytest.raises(fm.CrdNotInstalledError) as listing:
            runs.list()
        with pytest.raises(fm.CrdNotInstalledError):
            runs.get("anything")
        with pytest.raises(fm.CrdNotInstalledError):
            next(runs.watch(name="anything"))
    message = str(listing.value)
    assert "trainingruns.absent.kubetune.dev" in message and "CRD is not installed" in message
    assert "helm install" in message or "kubectl apply" in message


def test_a_missing_run_is_run_not_found_for_every_function_and_verb(
        crd, cluster, kubectl, namespace, tmp_path, monkeypatch):
    kubeconfig = kubeconfig_for(cluster, kubectl, tmp_path, namespace, None)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for call in (lambda: fm.get("nope"), lambda: fm.get_events("nope"), lambda: fm.get_events("nope", follow=True),
                 lambda: fm.cancel("nope"), lambda: fm.delete(["nope"]), lambda: fm.get_checkpoints("nope")):
        with pytest.raises(fm.RunNotFoundError) as raised:
            call()
        assert "'nope' not found" in str(raised.value) and namespace in str(raised.value)
    for verb in (["get", "nope"], ["events", "nope"], ["cancel", "nope"], ["delete", "nope"]):
        result = kubetune(kubeconfig, *verb)
        assert result.returncode == 3 and "not found" in result.stderr, (verb, result.stderr)
        no_traceback(result)


def test_a_name_taken_twice_is_invalid_arguments_and_the_first_run_is_untouched(
        crd, cluster, kubectl, namespace, tmp_path, monkeypatch):
    kubeconfig = kubeconfig_for(cluster, kubectl, tmp_path, namespace, None)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    first = fm.create(**SPEC, name="taken", training_duration="2ep")
    assert (first.name, first.namespace, first.status) == ("taken", namespace, fm.RunStatus.PENDING)
    with pytest.raises(fm.InvalidArgumentsError, match="already exists"):
        fm.create(**SPEC, name="taken")
    assert fm.get("taken").training_duration == "2ep"
    run_file = tmp_path / "taken.yaml"
    run_file.write_text(yaml.safe_dump({"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
                                        "metadata": {"name": "taken", "namespace": namespace}, "spec": {}}))
    shown = kubetune(kubeconfig, "get", "-f", str(run_file), "-o", "name")
    assert shown.returncode == 0 and shown.stdout.split() == ["trainingrun.kubetune.dev/taken"], shown.stderr
    assert fm.delete("taken") == 1
    with pytest.raises(fm.InvalidArgumentsError, match="either the run"):
        fm.cancel()


def pipeline_reads_runs(kubectl, namespace: str) -> None:
    """ServiceAccount `pipeline`, allowed to read the namespace's runs and nothing else."""
    kubectl("create", "serviceaccount", "pipeline", "-n", namespace)
    kubectl("create", "role", "runs-reader", "--verb=get,list,watch", "--resource=trainingruns.kubetune.dev",
            "-n", namespace)
    kubectl("create", "rolebinding", "pipeline-reads-runs", "--role=runs-reader", "--serviceaccount",
            f"{namespace}:pipeline", "-n", namespace)


IN_A_POD = """
from kubetune import foundation_model as fm
print("listed:", ",".join(run.name for run in fm.list()))
try:
    fm.cancel("seen-from-a-pod")
except fm.PermissionDeniedError as error:
    print("refused:", error)
"""


def test_in_a_real_pod_the_sdk_uses_the_token_the_kubelet_mounted(crd, cluster, kubectl, namespace, site, wait_for):
    """The test below, in a pod of the trainer image: the kubelet's projected token, namespace file
    and CA, and the `kubernetes` Service's address (through kube-proxy) are all the SDK needs."""
    if cluster.agent:
        pytest.skip("the node agent's pods are processes of this machine: the test below stands in")
    pipeline_reads_runs(kubectl, namespace)
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "seen-from-a-pod"},
        "spec": {"model": SPEC["model"], "trainDataPath": SPEC["train_data_path"], "registerTo": "main.ml"}}))
    container = {"name": "sdk", "image": site.trainer_image, "imagePullPolicy": site.pull_policy,
                 "command": [*site.python, "-c", IN_A_POD], "env": [{"name": "HOME", "value": "/tmp"}],
                 "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    job = restricted_job(namespace, "sdk-in-a-pod", {
        "serviceAccountName": "pipeline", "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}]})
    out = run_tool(kubectl, wait_for, job)
    assert "listed: seen-from-a-pod\n" in out, out  # its namespace, its rights
    assert "refused: " in out and f"serviceaccount:{namespace}:pipeline" in out, out


def test_in_a_pod_without_kubeconfig_the_service_account_and_its_namespace_are_used(
        crd, cluster, kubectl, namespace, tmp_path, monkeypatch):
    """The pod's view, as the kubelet mounts it: token, CA and namespace in the ServiceAccount folder
    (here a folder of this machine, named by KUBETUNE_SERVICE_ACCOUNT_DIR) and the service's address."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == cluster.context)["context"]
    server = next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"]
    account = tmp_path / "serviceaccount"
    account.mkdir()
    pipeline_reads_runs(kubectl, namespace)
    (account / "token").write_text(kubectl("create", "token", "pipeline", "-n", namespace).stdout.strip())
    (account / "namespace").write_text(namespace)
    if server.get("certificate-authority-data"):
        import base64

        (account / "ca.crt").write_bytes(base64.b64decode(server["certificate-authority-data"]))
    else:
        (account / "ca.crt").write_text(Path(server["certificate-authority"]).read_text())
    host, port = server["server"].removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("KUBETUNE_SERVICE_ACCOUNT_DIR", str(account))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump({
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "seen-from-a-pod"},
        "spec": {"model": SPEC["model"], "trainDataPath": SPEC["train_data_path"], "registerTo": "main.ml"}}))
    assert [run.name for run in fm.list()] == ["seen-from-a-pod"]  # the pod's namespace, its rights
    with pytest.raises(fm.PermissionDeniedError, match=f"serviceaccount:{namespace}:pipeline"):
        fm.cancel("seen-from-a-pod")  # it may read runs, not patch them
