"""Kueue, for real: the Kueue manager built from its Go module (sigs.k8s.io/kueue v0.19.2) runs
against the local control plane, its Job and queue webhooks registered with the API server (by
URL: there is no Service routing here), with a ResourceFlavor, a ClusterQueue and a LocalQueue.

The quota is CPU, not `nvidia.com/gpu`: a run that asks for GPUs trains with CUDA, which this
machine has not, so the runs ask for `resources.cpu` and the queue holds one CPU. Kueue's
decisions (admit, keep waiting, preempt, re-admit) are the same for any resource it counts.

- Two runs that each need the whole quota: the second waits `Queued` (its Workload says why,
  naming the ClusterQueue) and trains after the first's training ends.
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
from .test_controls import (checkpoint_batch, first_trained_batch, rank0_log, wait_checkpoint,
                            wait_succeeded)

pytestmark = [
    pytest.mark.cluster, pytest.mark.slow,
    # Written against the real manager but not yet run to green here (the build finished too late
    # for a run on this machine): opt in until it has passed once.
    pytest.mark.skipif(os.environ.get("KUBETUNE_E2E_KUEUE") != "1",
                       reason="opt-in until first green: KUBETUNE_E2E_KUEUE=1 make test-e2e"),
]

KUEUE_MODULE = "sigs.k8s.io/kueue@v0.19.2"
CLUSTER_QUEUE, LOCAL_QUEUE, FLAVOR = "kt-cluster-queue", "team-queue", "kt-default"
RUN_TIMEOUT = 420


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


def queues(namespace: str) -> list[dict]:
    return [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
         "metadata": {"name": CLUSTER_QUEUE},
         "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO",
                  "preemption": {"withinClusterQueue": "LowerPriority"},
                  "resourceGroups": [{"coveredResources": ["cpu"], "flavors": [
                      {"name": FLAVOR, "resources": [{"name": "cpu", "nominalQuota": "1"}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
         "metadata": {"name": LOCAL_QUEUE, "namespace": namespace},
         "spec": {"clusterQueue": CLUSTER_QUEUE}},
        *[{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
           "metadata": {"name": name}, "value": value, "globalDefault": False}
          for name, value in (("kt-low", 100), ("kt-high", 1000))],
    ]


@pytest.fixture
def kueue(operator, cluster, kubectl, namespace, wait_for, tmp_path):
    if not cluster.local:
        pytest.skip("runs its own Kueue manager against the local control plane")
    if shutil.which("go") is None:
        pytest.skip("the Kueue manager is built from its Go module")
    built = subprocess.run(["bash", str(REPO / "tools" / "go-tool.sh"), "kueue"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    source = kueue_source()
    kubectl("apply", "--server-side", "-f", str(source / "config/components/crd/bases"))
    for crd in ("clusterqueues", "localqueues", "resourceflavors", "workloads"):
        kubectl("wait", "--for=condition=Established", f"crd/{crd}.kueue.x-k8s.io", "--timeout=60s")
    kubectl("create", "namespace", "kueue-system", check=False)
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = pki.make_ca(certs, "kueue-webhook-ca")
    pki.issue(ca, certs, "tls", "kueue-webhook", dns=("localhost",), ips=("127.0.0.1",))
    port = free_port()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(manager_config(port, certs)))
    log = open(tmp_path / "kueue.log", "wb")
    process = subprocess.Popen(
        [built.stdout.strip().splitlines()[-1], f"--config={tmp_path / 'config.yaml'}",
         "--feature-gates=VisibilityOnDemand=false", "--zap-log-level=info"],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, stdout=log, stderr=subprocess.STDOUT)
    registered = webhooks(source, port, base64.b64encode(ca.cert.read_bytes()).decode())
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True,
                 120, "Kueue's webhook server")
        apply(kubectl, registered)
        # The webhooks validate the queues: applying them proves the API server reaches Kueue.
        wait_for(lambda: kubectl("apply", "-f", "-", input=yaml.safe_dump_all(queues(namespace)),
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


def queued_spec(inputs: Inputs, data: str, duration: str, priority: str | None = None) -> dict:
    scheduling = {"queueName": LOCAL_QUEUE, **({"priorityClassName": priority} if priority else {})}
    return {"model": inputs.model, "trainDataPath": inputs.data(data), "registerTo": "main.e2e.kueue",
            "trainingDuration": duration, "learningRate": 1e-3, "contextLength": 128,
            "globalBatchSize": 8, "resources": {"cpu": "1"}, "scheduling": scheduling}


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


def test_a_run_waits_in_the_queue_for_the_quota_and_trains_after_the_first(
        kueue, operator, kubectl, namespace, inputs, wait_for):
    create(kubectl, namespace, "first", queued_spec(inputs, "ift.jsonl", "1ep"))
    wait_phase(kubectl, namespace, "first", {"Training"}, RUN_TIMEOUT, operator)
    create(kubectl, namespace, "second", queued_spec(inputs, "ift.jsonl", "1ep"))
    pending = wait_for(lambda: train_workload(kubectl, namespace, "second"), RUN_TIMEOUT,
                       "the second run's training Workload")
    assert phase(kubectl, namespace, "second") == "Queued"
    assert phase(kubectl, namespace, "first") in ("Training", "Registering", "Succeeded")
    reasons = [c.get("message", "") for c in pending.get("status", {}).get("conditions", [])]
    assert any(CLUSTER_QUEUE in m for m in reasons), reasons  # Kueue says which queue holds it
    second = wait_succeeded(kubectl, namespace, "second", operator)
    first = kubectl.json("get", "trainingrun", "first", "-n", namespace)
    assert first["status"]["phase"] == "Succeeded"
    trained = {e["type"]: e["time"] for e in first["status"]["events"]}
    started = {e["type"]: e["time"] for e in second["status"]["events"]}
    assert started["TRAIN_STARTED"] >= trained["TRAIN_FINISHED"]


def test_a_higher_priority_run_preempts_and_the_preempted_one_resumes_from_its_checkpoint(
        kueue, operator, kubectl, namespace, inputs, wait_for):
    create(kubectl, namespace, "low", queued_spec(inputs, "ift-long.jsonl", "4ep", "kt-low"))
    checkpoint = wait_checkpoint(kubectl, namespace, "low", wait_for)
    create(kubectl, namespace, "high", queued_spec(inputs, "ift.jsonl", "1ep", "kt-high"))
    wait_for(lambda: phase(kubectl, namespace, "low") == "Queued", RUN_TIMEOUT, "low to be preempted")
    wait_succeeded(kubectl, namespace, "high", operator)
    wait_phase(kubectl, namespace, "low", {"Training"}, RUN_TIMEOUT, operator)
    resumed = wait_for(lambda: first_trained_batch(rank0_log(kubectl, namespace, "low", 1)), RUN_TIMEOUT,
                       "the re-admitted trainer's first batch")
    assert resumed >= checkpoint > 0
    low = wait_succeeded(kubectl, namespace, "low", operator)
    assert low["status"]["attempts"] == 1  # a preemption is not a failed attempt
    assert checkpoint_batch(low["status"]["latestCheckpoint"]) > resumed
