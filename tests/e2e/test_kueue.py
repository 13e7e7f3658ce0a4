"""Kueue, for real: the Kueue manager built from its Go module (sigs.k8s.io/kueue v0.19.2) runs
against this machine's control plane, its Job and queue webhooks registered with the API server (by
URL: there is no Service routing here), with a ResourceFlavor, a ClusterQueue and, per test, a
LocalQueue. One manager serves the module's tests.

The quota is one `nvidia.com/gpu`, the stand-in resource the test node advertises; each run asks
for that GPU, and its trainer trains on CPU because the operator is told the GPUs are a stand-in
(KUBETUNE_CPU_FALLBACK, set by the e2e site).

- Two runs that each need the whole quota: the second's data is prepared at once, its training
  Job waits (`Queued`, the Running condition naming the LocalQueue, the Workload saying what is
  short) and trains after the first's training ends.
- A higher-priority run preempts a training one, which resumes from its checkpoint when Kueue
  admits it again.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cluster import pki
from tests.support.ports import free_port

from .conftest import apply, trainingrun, wait_phase
from .site import REPO, Inputs
from .test_controls import first_trained_batch, rank0_log, wait_checkpoint

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

KUEUE_MODULE = "sigs.k8s.io/kueue@v0.19.2"
CLUSTER_QUEUE, LOCAL_QUEUE, FLAVOR = "kt-cluster-queue", "team-queue", "kt-default"
RUN_TIMEOUT = 420
GPU = "nvidia.com/gpu"   # the node's stand-in resource


def kueue_source() -> Path:
    out = subprocess.run(["go", "mod", "download", "-json", KUEUE_MODULE],
                         capture_output=True, text=True, check=True)
    return Path(json.loads(out.stdout)["Dir"])


def webhooks(source: Path, port: int, ca_bundle: str) -> list[dict]:
    """Kueue's webhook configurations, only for batch Jobs and Kueue's own kinds (the other
    integrations are off), pointed at the manager by URL."""
    configs = []
    for config in yaml.safe_load_all((source / "config/components/webhook/manifests.yaml").read_text()):
        hooks = []
        for hook in config["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            if "batch-v1-job" in path or "kueue-x-k8s-io" in path:
                hooks.append({**hook, "clientConfig": {"url": f"https://127.0.0.1:{port}{path}",
                                                       "caBundle": ca_bundle}})
        configs.append({**config, "metadata": {"name": f"kt-kueue-{config['kind'].lower()}"},
                        "webhooks": hooks})
    return configs


def manager_config(webhook_port: int, cert_dir: Path) -> dict:
    return {"apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{free_port()}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]}}


def cluster_queue() -> list[dict]:
    return [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
         "metadata": {"name": CLUSTER_QUEUE},
         "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO",
                  "preemption": {"withinClusterQueue": "LowerPriority"},
                  "resourceGroups": [{"coveredResources": [GPU], "flavors": [
                      {"name": FLAVOR, "resources": [{"name": GPU, "nominalQuota": "1"}]}]}]}},
        *[{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
           "metadata": {"name": name}, "value": value, "globalDefault": False}
          for name, value in (("kt-low", 100), ("kt-high", 1000))],
    ]


def local_queue(namespace: str) -> dict:
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": {"name": LOCAL_QUEUE, "namespace": namespace},
            "spec": {"clusterQueue": CLUSTER_QUEUE}}


# Kueue reads its metrics certificate from a fixed path, /etc/kueue/metrics/certs (a mounted
# Secret in its pod). Here it gets that path in a mount namespace of its own: /etc overlaid
# with the certificate, so this machine's /etc is not touched.
WITH_METRICS_CERT = """certs=$1; shift
mount -t tmpfs kueue-etc "$0"
mkdir -p "$0/upper/kueue/metrics/certs" "$0/work"
cp "$certs/tls.crt" "$certs/tls.key" "$0/upper/kueue/metrics/certs/"
mount -t overlay kueue-etc -o "lowerdir=/etc,upperdir=$0/upper,workdir=$0/work" /etc
exec "$@"
"""


def manager_command(binary: str, config: Path, certs: Path, scratch: Path) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", WITH_METRICS_CERT,
            str(scratch), str(certs), binary, f"--config={config}",
            "--feature-gates=VisibilityOnDemand=false", "--zap-log-level=info"]


def established(kubectl, crd: str) -> bool:
    conditions = (kubectl.json("get", f"crd/{crd}").get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def kueue_manager(operator, cluster, kubectl, wait_for, tmp_path_factory):
    """One Kueue manager, its webhooks and the ClusterQueue for every test of the module."""
    if cluster.control_plane is None:
        pytest.skip("runs its own Kueue manager against this machine's control plane")
    if shutil.which("go") is None:
        pytest.skip("the Kueue manager is built from its Go module")
    built = subprocess.run(["bash", str(REPO / "tools" / "go-tool.sh"), "kueue"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    source = kueue_source()
    kubectl("apply", "--server-side", "-f", str(source / "config/components/crd/bases"))
    for crd in ("clusterqueues", "localqueues", "resourceflavors", "workloads"):
        # Not `kubectl wait`: it errors out while a new CRD has no status conditions yet.
        wait_for(lambda: established(kubectl, f"{crd}.kueue.x-k8s.io"), 60, f"the {crd} CRD")
    kubectl("create", "namespace", "kueue-system", check=False)
    tmp_path = tmp_path_factory.mktemp("kueue")
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = pki.make_ca(certs, "kueue-webhook-ca")
    pki.issue(ca, certs, "tls", "kueue-webhook", dns=("localhost",), ips=("127.0.0.1",))
    port = free_port()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(manager_config(port, certs)))
    log = open(tmp_path / "kueue.log", "wb")
    scratch = tmp_path / "etc-overlay"
    scratch.mkdir()
    process = subprocess.Popen(
        manager_command(built.stdout.strip().splitlines()[-1], tmp_path / "config.yaml", certs, scratch),
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, stdout=log, stderr=subprocess.STDOUT)
    registered = webhooks(source, port, base64.b64encode(ca.cert.read_bytes()).decode())
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True,
                 120, "Kueue's webhook server")
        apply(kubectl, registered)
        # The webhooks validate the queues: applying them proves the API server reaches Kueue.
        wait_for(lambda: kubectl("apply", "-f", "-", input=yaml.safe_dump_all(cluster_queue()),
                                 check=False).returncode == 0, 60, "the queues to be accepted")
        wait_for(lambda: any(c["type"] == "Active" and c["status"] == "True" for c in
                             kubectl.json("get", "clusterqueue", CLUSTER_QUEUE)["status"].get("conditions", [])),
                 60, "the ClusterQueue to be active")
        yield tmp_path / "kueue.log"
    finally:
        # Webhooks first: with Kueue gone, every Job create would fail on them.
        for config in registered:
            kubectl("delete", config["kind"], config["metadata"]["name"], "--ignore-not-found", check=False)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        kubectl("delete", "clusterqueue", CLUSTER_QUEUE, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def kueue(kueue_manager, kubectl, namespace):
    """The test namespace's LocalQueue on the shared ClusterQueue; the manager's log."""
    apply(kubectl, [local_queue(namespace)])
    return kueue_manager


def queued_spec(inputs: Inputs, data: str, duration: str, priority: str | None = None) -> dict:
    scheduling = {"queueName": LOCAL_QUEUE, **({"priorityClassName": priority} if priority else {})}
    return {"model": inputs.model, "trainDataPath": inputs.data(data), "registerTo": "main.e2e.kueue",
            "trainingDuration": duration, "learningRate": 1e-3, "contextLength": 128,
            "globalBatchSize": 8, "resources": {"gpusPerNode": 1}, "scheduling": scheduling}


def create(kubectl, namespace: str, name: str, spec: dict) -> None:
    apply(kubectl, [{**trainingrun(name, spec), "metadata": {"name": name, "namespace": namespace}}])


def phase(kubectl, namespace: str, name: str) -> str | None:
    return (kubectl.json("get", "trainingrun", name, "-n", namespace).get("status") or {}).get("phase")


def train_workload(kubectl, namespace: str, run: str) -> dict | None:
    for workload in kubectl.json("get", "workloads", "-n", namespace)["items"]:
        owners = workload["metadata"].get("ownerReferences") or []
        if any(o["kind"] == "Job" and o["name"].startswith(f"{run}-train-") for o in owners):
            return workload
    return None


def waiting_reason(workload: dict | None) -> str | None:
    """Kueue's message on a Workload it has not reserved quota for (it names what is short)."""
    conditions = ((workload or {}).get("status") or {}).get("conditions") or []
    return next((c.get("message") for c in conditions
                 if c["type"] == "QuotaReserved" and c["status"] == "False"), None)


def waiting_workload(kubectl, namespace: str, run: str) -> dict | None:
    workload = train_workload(kubectl, namespace, run)
    return workload if waiting_reason(workload) else None


def job_status(kubectl, namespace: str, name: str) -> dict:
    return kubectl.json("get", "job", name, "-n", namespace).get("status") or {}


def cancel(kubectl, namespace: str, *runs: str) -> None:
    """Stop what is left of runs whose queueing has been seen (their own ends are other tests')."""
    for run in runs:
        kubectl("annotate", "trainingrun", run, "-n", namespace, "kubetune.dev/cancel=true", "--overwrite")


def test_a_run_waits_in_the_queue_for_the_quota_and_trains_after_the_first(
        kueue, operator, kubectl, namespace, inputs, wait_for):
    create(kubectl, namespace, "first", queued_spec(inputs, "ift.jsonl", "1ep"))
    wait_phase(kubectl, namespace, "first", {"Training"}, RUN_TIMEOUT, operator)
    create(kubectl, namespace, "second", queued_spec(inputs, "ift.jsonl", "1ep"))
    pending = wait_for(lambda: waiting_workload(kubectl, namespace, "second"), RUN_TIMEOUT,
                       "Kueue to say why the second run's training Workload waits")
    assert pending["spec"]["queueName"] == LOCAL_QUEUE
    why = waiting_reason(pending)
    assert f"insufficient unused quota for {GPU}" in why, why
    status = kubectl.json("get", "trainingrun", "second", "-n", namespace)["status"]
    assert status["phase"] == "Queued", status
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert running["reason"] == "Queued" and f"LocalQueue {LOCAL_QUEUE}" in running["message"], running
    # Only the training Job waits: the second run's data was prepared while the first trained.
    assert any(c["type"] == "DataPrepared" and c["status"] == "True" for c in status["conditions"])
    # The Job controller counts the pod a moment after the operator has seen it succeed.
    wait_for(lambda: job_status(kubectl, namespace, "second-prep").get("succeeded") == 1, 60,
             "the Job controller to count the second run's prep pod")
    # The Job controller stamps startTime when Kueue un-suspends a Job: the second's training
    # starts once the first's has finished and given the quota back.
    started = wait_for(lambda: job_status(kubectl, namespace, "second-train-1").get("startTime"), RUN_TIMEOUT,
                       "Kueue to admit the second run's training Job")
    first_done = job_status(kubectl, namespace, "first-train-1").get("completionTime")
    assert first_done and started >= first_done, (first_done, started)
    wait_phase(kubectl, namespace, "second", {"Training", "Registering", "Succeeded"}, RUN_TIMEOUT, operator)
    cancel(kubectl, namespace, "first", "second")


def test_a_higher_priority_run_preempts_and_the_preempted_one_resumes_from_its_checkpoint(
        kueue, operator, kubectl, namespace, inputs, wait_for):
    # Short epochs (a checkpoint each, within seconds), and too many to finish here: it is
    # cancelled once its resume is seen.
    create(kubectl, namespace, "low", queued_spec(inputs, "ift.jsonl", "500ep", "kt-low"))
    checkpoint = wait_checkpoint(kubectl, namespace, "low", wait_for)
    create(kubectl, namespace, "high", queued_spec(inputs, "ift.jsonl", "1ep", "kt-high"))
    wait_for(lambda: phase(kubectl, namespace, "low") == "Queued", RUN_TIMEOUT, "low to be preempted")
    # Re-admitted once high's training has finished and freed the quota.
    wait_phase(kubectl, namespace, "low", {"Training"}, RUN_TIMEOUT, operator)
    assert job_status(kubectl, namespace, "high-train-1").get("succeeded") == 1
    resumed = wait_for(lambda: first_trained_batch(rank0_log(kubectl, namespace, "low", 1)), RUN_TIMEOUT,
                       "the re-admitted trainer's first batch")
    assert resumed >= checkpoint > 0
    wait_checkpoint(kubectl, namespace, "low", wait_for, after=resumed)  # and it trains on
    low = kubectl.json("get", "trainingrun", "low", "-n", namespace)
    assert low["status"]["attempts"] == 1  # a preemption is not a failed attempt
    cancel(kubectl, namespace, "low", "high")
