"""A TrainingRun applied with the real kubectl goes all the way, through the real API server.

The operator is the real `kubetune operator` process under its own ServiceAccount; the pods run
in namespaces that enforce Pod Security `restricted`; the model is registered in a real MLflow
server. Marked `cluster`: they need the control plane built from Go modules (or a real cluster,
see `site.py`).
"""

from __future__ import annotations

import json
import pytest

from .conftest import OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, apply, trainingrun, wait_phase
from .site import Inputs, read_stored
from .timeline import format_timeline, run_timeline

pytestmark = pytest.mark.cluster
RUN_TIMEOUT = 420
TASKS = {  # the data of each task type, under the staged inputs
    "INSTRUCTION_FINETUNE": "ift.jsonl",
    "CHAT_COMPLETION": "chat.jsonl",
    "CONTINUED_PRETRAIN": "cpt",
}


def small_spec(inputs: Inputs, task: str, **extra) -> dict:
    return {"model": inputs.model, "taskType": task, "trainDataPath": inputs.data(TASKS[task]),
            "registerTo": f"main.e2e.{task.lower()}", "trainingDuration": "1ep",
            "learningRate": 1e-3, "contextLength": 128, "globalBatchSize": 8, **extra}


def event_types(run: dict) -> list[str]:
    return [event["type"] for event in run["status"].get("events") or []]


def condition(run: dict, type_: str) -> dict:
    return next(c for c in run["status"]["conditions"] if c["type"] == type_)


def registered_versions(tracking_uri: str, name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'")


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_type_goes_to_succeeded_with_a_registered_model(
        task, operator, kubectl, namespace, inputs, site):
    name = f"run-{task.lower().replace('_', '-')}"
    apply(kubectl, [{**trainingrun(name, small_spec(inputs, task)),
                     "metadata": {"name": name, "namespace": namespace}}])
    kubectl("wait", "--for=condition=Succeeded", f"trainingrun/{name}", "-n", namespace,
            f"--timeout={RUN_TIMEOUT}s", timeout=RUN_TIMEOUT + 30)
    run = kubectl.json("get", "trainingrun", name, "-n", namespace)
    status = run["status"]
    print(f"timeline of {name}:\n{format_timeline(run_timeline(kubectl, namespace, name))}")

    assert status["phase"] == "Succeeded"
    assert condition(run, "Succeeded")["status"] == "True"
    registered = status["registeredModel"]
    assert registered["name"] == f"main.e2e.{task.lower()}" and str(registered["version"]) == "1"
    assert status["dataStats"]["samples"] > 0 and status["dataStats"]["tokens"] > 0
    assert status["mlflow"]["runId"]
    types = event_types(run)
    for expected in ["CREATED", "VALIDATED", "DATA_VALIDATED", "TRAIN_STARTED", "TRAIN_FINISHED",
                     "REGISTERED", "COMPLETED"]:
        assert expected in types, types
    assert types.index("CREATED") < types.index("TRAIN_STARTED") < types.index("COMPLETED")
    versions = registered_versions(site.tracking_uri, registered["name"])
    assert len(versions) == 1 and versions[0].tags.get("kubetune.run_uid") == run["metadata"]["uid"]

    # The typed events are mirrored as Kubernetes Events on the resource.
    events = kubectl.json("get", "events", "-n", namespace,
                          f"--field-selector=involvedObject.name={name}")["items"]
    assert {"Created", "Completed"} <= {e["reason"] for e in events}
    # `kubectl get trainingruns` shows the printer columns.
    table = kubectl("get", "trainingruns", "-n", namespace).stdout
    assert "PHASE" in table and "Succeeded" in table and "MODEL" in table


def test_spec_errors_are_refused_by_the_api_server(operator, kubectl, namespace):
    spec = small_spec(Inputs("/nowhere"), "INSTRUCTION_FINETUNE",
                      registerTo="no-dots-here", trainingDuration="10 minutes")
    document = {**trainingrun("bad", spec), "metadata": {"name": "bad", "namespace": namespace}}
    import yaml

    result = kubectl("apply", "-f", "-", input=yaml.safe_dump(document), check=False)
    assert result.returncode != 0
    assert "registerTo" in result.stderr and "trainingDuration" in result.stderr


def test_a_spec_only_the_operator_can_judge_fails_naming_the_field_and_makes_no_pods(
        operator, kubectl, namespace):
    # The CRD cannot know a catalog model's context window; the operator's validation does.
    spec = small_spec(Inputs("/nowhere"), "INSTRUCTION_FINETUNE", model="google/gemma-2-9b-it",
                      contextLength=16384)
    apply(kubectl, [{**trainingrun("too-long", spec),
                     "metadata": {"name": "too-long", "namespace": namespace}}])
    run = wait_phase(kubectl, namespace, "too-long", {"Failed"}, 60, operator)
    failed = condition(run, "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.contextLength" in failed["message"]
    assert kubectl.json("get", "pods,jobs", "-n", namespace)["items"] == []
    assert "FAILED" in event_types(run)


def test_two_nodes_get_the_distributed_environment_and_both_ranks_train(
        operator, cluster, kubectl, namespace, inputs, site, wait_for):
    spec = small_spec(inputs, "INSTRUCTION_FINETUNE", resources={"nodes": 2},
                      registerTo="main.e2e.two_nodes")
    apply(kubectl, [{**trainingrun("two-nodes", spec),
                     "metadata": {"name": "two-nodes", "namespace": namespace}}])
    kubectl("wait", "--for=condition=Succeeded", "trainingrun/two-nodes", "-n", namespace,
            f"--timeout={RUN_TIMEOUT}s", timeout=RUN_TIMEOUT + 30)
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", "kubetune.dev/component=train")["items"]
    assert len(pods) == 2
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["NNODES"]["value"] == "2"
        assert env["MASTER_ADDR"]["value"].startswith("two-nodes-train-")
        assert "fieldRef" in env["NODE_RANK"]["valueFrom"]
        assert pod["status"]["phase"] == "Succeeded"
    if cluster.kubelets:   # two real nodes: the ranks spread over them, the rendezvous crossed the pod network
        assert len({pod["spec"]["nodeName"] for pod in pods}) == 2, [pod["spec"]["nodeName"] for pod in pods]
    ranks = [json.loads(read_stored(kubectl, wait_for, site, namespace,
                                    f"two-nodes/result/weights-rank{rank}.json", f"read-weights-{rank}"))
             for rank in (0, 1)]
    assert ranks[0]["final"] == ranks[1]["final"] != ranks[0]["initial"]  # both trained, in step
    assert kubectl.json("get", "trainingrun", "two-nodes", "-n", namespace)["status"]["attempts"] == 1


def test_pods_meet_pod_security_restricted_and_the_operator_is_not_admin(
        operator, kubectl, namespace):
    labels = kubectl.json("get", "namespace", namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    account = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"

    def can(verb: str, resource: str) -> bool:
        result = kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={account}", check=False)
        return result.stdout.strip() == "yes"

    assert can("create", "jobs.batch") and can("patch", "trainingruns.kubetune.dev/status")
    assert not can("get", "secrets") and not can("create", "pods") and not can("delete", "namespaces")
    assert not can("update", "jobs.batch")


def test_a_run_with_object_store_storage_keeps_its_files_in_the_bucket_and_its_secret_referenced(
        operator, kubectl, namespace, inputs, site, local_s3):
    """storage.uri on S3, credentials in a Secret that the pods reference: the run succeeds, the
    bucket holds data, checkpoints and the model, and no credential reaches status or config."""
    s3_store = local_s3
    name, prefix = "run-on-s3", f"e2e/{namespace}"
    secret_key = "s3cr3t-" + namespace[-6:]
    env = {**s3_store.env, "AWS_SECRET_ACCESS_KEY": secret_key}  # moto accepts any key
    apply(kubectl, [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bucket", "namespace": namespace},
                     "stringData": env}])
    spec = small_spec(inputs, "INSTRUCTION_FINETUNE",
                      registerTo="main.e2e.on_s3", storage={"uri": s3_store.uri(prefix)},
                      secrets={"objectStore": {"name": "bucket"}})
    apply(kubectl, [{**trainingrun(name, spec), "metadata": {"name": name, "namespace": namespace}}])
    run = wait_phase(kubectl, namespace, name, {"Succeeded", "Failed"}, RUN_TIMEOUT, operator)
    assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"])[:3000]

    work = f"{prefix}/{namespace}/{name}"
    keys = s3_store.keys(work)
    for expected in ("data/_SUCCESS", "checkpoints/latest-rank0.pt.symlink", "hf/model.safetensors",
                     "result/train.json"):
        assert expected in keys, (expected, keys)
    assert run["status"]["latestCheckpoint"].startswith(s3_store.uri(f"{work}/checkpoints/"))
    assert len(registered_versions(site.tracking_uri, "main.e2e.on_s3")) == 1
    seen = json.dumps(run) + kubectl("get", "configmaps,events", "-n", namespace, "-o", "json").stdout
    assert secret_key not in seen
