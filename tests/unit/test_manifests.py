"""Child manifests: golden files, Kubernetes 1.35 schemas, Pod Security `restricted`, wiring.

Regenerate the golden files after an intended change with `KUBETUNE_UPDATE_GOLDEN=1`, and read
the diff before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune import manifests as m
from kubetune.api import parse_training_run
from kubetune.resolve import ResolveError, resolve_config
from kubetune.settings import OperatorSettings

GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = "1.35.0"
SETTINGS = OperatorSettings(trainer_image="ghcr.io/kubetune/trainer:0.1.0")


def _body(name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": "ml-team", "uid": f"uid-{name}",
                         "generation": 1, "annotations": annotations or {}},
            "spec": spec}


CPU_RUN = _body("tiny", {
    "model": "meta-llama/Llama-3.2-1B-Instruct",
    "trainDataPath": "/mnt/kubetune/datasets/train.jsonl",
    "registerTo": "main.finetunes",
    "trainingDuration": "10ba",
    "globalBatchSize": 4,
    "resources": {"cpu": "2", "memory": "8Gi"},
})

GPU_RUN = _body("llama-chat", {
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "trainDataPath": "s3://datasets/chat/train.jsonl",
    "evalDataPath": "s3://datasets/chat/eval.jsonl",
    "registerTo": "main.finetunes.llama_chat",
    "taskType": "CHAT_COMPLETION",
    "globalBatchSize": 64,
    "learningRate": 1e-5,
    "resources": {"nodes": 2, "gpusPerNode": 8, "cpu": "64", "memory": "900Gi",
                  "sharedMemory": "64Gi"},
    "dataPrep": {"parallelism": 8, "resources": {"cpu": "8", "memory": "32Gi"}},
    "image": {"trainer": "registry.example.com/kubetune/trainer:cuda", "pullPolicy": "Always"},
    "storage": {"pvc": {"claimName": "ml-scratch", "subPath": "kubetune"}},
    "mlflow": {"trackingUri": "http://mlflow.mlflow.svc:5000"},
    "secrets": {"hfToken": {"name": "hf", "key": "token"}, "mlflow": {"name": "mlflow-creds"},
                "objectStore": {"name": "s3-creds"}},
    "scheduling": {"nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                    "effect": "NoSchedule"}],
                   "priorityClassName": "training", "queueName": "gpu-queue"},
    "activeDeadlineSeconds": 86400,
}, annotations={"kubetune.dev/owner": "alice"})


def _context(body: dict, attempt: int = 1, settings: OperatorSettings = SETTINGS) -> m.BuildContext:
    run = parse_training_run(body)
    return m.BuildContext(run, settings, resolve_config(run, settings), attempt)


def _children(ctx: m.BuildContext) -> list[dict[str, Any]]:
    return [m.build_config_map(ctx), m.build_prep_job(ctx), m.build_service(ctx),
            m.build_train_job(ctx), m.build_finalize_job(ctx)]


CASES = {"cpu-1node": CPU_RUN, "gpu-2x8": GPU_RUN}


def _pod_specs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    if manifest["kind"] == "Job":
        return [manifest["spec"]["template"]["spec"]]
    return []


def _all_children() -> list[dict[str, Any]]:
    return [child for body in CASES.values() for child in _children(_context(body))]


# --- golden files ----------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config JSON) as readable literal blocks."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = yaml.dump_all(_children(_context(CASES[case])), Dumper=_Dumper, sort_keys=True)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with KUBETUNE_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{case} differs from {path}; if intended, regenerate it"


# --- schemas and pod security ----------------------------------------------------------------

@pytest.mark.parametrize("manifest", _all_children(),
                         ids=lambda c: f"{c['kind']}-{c['metadata']['name']}")
def test_validates_against_kubernetes_schema(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_schema_validation_catches_mistakes() -> None:
    job = m.build_train_job(_context(CPU_RUN))
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security `restricted` profile (v1.35) checks that apply to what we build."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("host namespaces")
    for volume in pod.get("volumes", []):
        allowed = {"name", "configMap", "emptyDir", "persistentVolumeClaim", "secret",
                   "projected", "downwardAPI", "csi", "ephemeral"}
        if set(volume) - allowed:
            problems.append(f"volume type of {volume['name']}")
    if pod_sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("pod seccompProfile")
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        sc = container.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append("allowPrivilegeEscalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            problems.append("capabilities")
        if sc.get("privileged"):
            problems.append("privileged")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append("runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append("runAsUser 0")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append("hostPort")
    return problems


@pytest.mark.parametrize("manifest", [c for c in _all_children() if c["kind"] == "Job"],
                         ids=lambda c: c["metadata"]["name"])
def test_every_pod_is_restricted(manifest: dict[str, Any]) -> None:
    for pod in _pod_specs(manifest):
        assert restricted_violations(pod) == []
        assert pod["automountServiceAccountToken"] is False
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_restricted_check_can_fail() -> None:
    pod = m.build_prep_job(_context(CPU_RUN))["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_violations(pod) == ["volume type of host", "allowPrivilegeEscalation"]


# --- wiring ----------------------------------------------------------------------------------

def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_every_child_is_labelled_and_owned() -> None:
    for child in _all_children():
        meta = child["metadata"]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
        assert meta["labels"]["kubetune.dev/run"] in ("tiny", "llama-chat")
        [owner] = meta["ownerReferences"]
        assert owner["kind"] == "TrainingRun" and owner["controller"] and owner["blockOwnerDeletion"]
        assert owner["uid"] == f"uid-{meta['labels']['kubetune.dev/run']}"


def test_distributed_training_job() -> None:
    job = m.build_train_job(_context(GPU_RUN, attempt=3))
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert job["metadata"]["name"] == "llama-chat-train-3"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 0
    assert pod["subdomain"] == "llama-chat-train"
    container = pod["containers"][0]
    env = _env(container)
    assert env["MASTER_ADDR"] == "llama-chat-train-3-0.llama-chat-train.ml-team.svc"
    assert env["NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert (env["NNODES"], env["NPROC_PER_NODE"], env["MASTER_PORT"]) == ("2", "8", "29500")
    assert container["command"][:1] == ["torchrun"]
    assert "$(NODE_RANK)" in container["command"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert spec["suspend"] is True  # Kueue admits it
    assert job["spec"]["template"]["metadata"]["labels"]["kubetune.dev/attempt"] == "3"
    assert job["metadata"]["labels"]["kubetune.dev/attempt"] == "3"
    assert "kubetune.dev/attempt" not in m.build_service(_context(GPU_RUN))["metadata"]["labels"]
    [spread] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread["podAffinityTerm"] == {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
        "matchLabels": {"kubetune.dev/run": "llama-chat", "kubetune.dev/component": "train",
                        "kubetune.dev/attempt": "3"}}}
    assert "affinity" not in m.build_train_job(_context(CPU_RUN))["spec"]["template"]["spec"]


def test_single_process_runs_without_torchrun() -> None:
    container = m.build_train_job(_context(CPU_RUN))["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "kubetune_trainer", "train", "--config",
                                    "/etc/kubetune/config.json"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])


def test_launch_commands_come_from_settings() -> None:
    settings = OperatorSettings(trainer_command=["/venv/bin/python", "-m", "kubetune_trainer"],
                                torchrun_command=["/venv/bin/torchrun"])
    body = {**CPU_RUN, "spec": {**CPU_RUN["spec"], "resources": {"processesPerNode": 2}}}
    ctx = _context(body, settings=settings)
    train = m.build_train_job(ctx)["spec"]["template"]["spec"]["containers"][0]["command"]
    prep = m.build_prep_job(ctx)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert train[0] == "/venv/bin/torchrun"
    assert train[-5:] == ["-m", "kubetune_trainer", "train", "--config", "/etc/kubetune/config.json"]
    assert prep[:4] == ["/venv/bin/python", "-m", "kubetune_trainer", "prepare"]


def test_secrets_are_references_only() -> None:
    for child in _children(_context(GPU_RUN)):
        text = json.dumps(child)
        for pod in _pod_specs(child):
            container = pod["containers"][0]
            assert _env(container)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
            assert container["envFrom"] == [{"secretRef": {"name": "mlflow-creds"}},
                                            {"secretRef": {"name": "s3-creds"}}]
        assert '"kind": "Secret"' not in text


def test_storage_pvc_and_config_mounts() -> None:
    pod = m.build_prep_job(_context(GPU_RUN))["spec"]["template"]["spec"]
    mounts = {v["name"]: v for v in pod["containers"][0]["volumeMounts"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True}
    assert mounts["storage"] == {"name": "storage", "mountPath": "/mnt/kubetune", "subPath": "kubetune"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"] == {"claimName": "ml-scratch"}
    assert volumes["config"]["configMap"] == {"name": "llama-chat-config"}


def test_object_store_storage_mounts_no_volume() -> None:
    body = {**CPU_RUN, "spec": {**CPU_RUN["spec"], "storage": {"uri": "s3://bucket/runs"}}}
    ctx = _context(body)
    assert ctx.config.work_dir == "s3://bucket/runs/ml-team/tiny"
    pod = m.build_train_job(ctx)["spec"]["template"]["spec"]
    assert "storage" not in {v["name"] for v in pod["volumes"]}
    assert "HF_HOME" not in _env(pod["containers"][0])
    # Every step stages its files in the pod's /tmp emptyDir.
    for job in (m.build_prep_job(ctx), m.build_train_job(ctx), m.build_finalize_job(ctx)):
        spec = job["spec"]["template"]["spec"]
        assert _env(spec["containers"][0])["KUBETUNE_SCRATCH_DIR"] == "/tmp/kubetune-stage"
        assert {"name": "tmp", "emptyDir": {}} in spec["volumes"]


def test_mounted_storage_needs_no_staging() -> None:
    pod = m.build_train_job(_context(CPU_RUN))["spec"]["template"]["spec"]
    assert "KUBETUNE_SCRATCH_DIR" not in _env(pod["containers"][0])


def test_config_map_is_the_resolved_config() -> None:
    ctx = _context(GPU_RUN)
    config_map = m.build_config_map(ctx)
    assert config_map["immutable"] is True
    config = json.loads(config_map["data"]["config.json"])
    assert config["work_dir"] == "/mnt/kubetune/ml-team/llama-chat"
    assert config["experiment_path"] == "/Users/alice/llama-chat"
    assert config["register_to"] == "main.finetunes.llama_chat"
    assert config["distributed"] == {"nodes": 2, "procs_per_node": 8, "gpus_per_node": 8, "fsdp": True}
    assert config["mlflow_tracking_uri"] == "http://mlflow.mlflow.svc:5000"
    assert config["prep_workers"] == 8
    assert "token" not in config_map["data"]["config.json"].lower()


def test_headless_service() -> None:
    service = m.build_service(_context(GPU_RUN))
    assert service["metadata"]["name"] == "llama-chat-train"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"kubetune.dev/run": "llama-chat",
                                           "kubetune.dev/component": "train"}


def test_prep_and_finalize_never_retry_user_errors() -> None:
    ctx = _context(CPU_RUN)
    for job in (m.build_prep_job(ctx), m.build_finalize_job(ctx)):
        rules = job["spec"]["podFailurePolicy"]["rules"]
        container = job["spec"]["template"]["spec"]["containers"][0]["name"]
        assert rules[0] == {"action": "FailJob", "onExitCodes": {
            "containerName": container, "operator": "In", "values": [2]}}


def test_finalize_runs_off_the_gpus() -> None:
    job = m.build_finalize_job(_context(GPU_RUN))
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "64", "memory": "900Gi"}, "limits": {"memory": "900Gi"}}


def test_only_the_training_job_of_a_queued_run_is_queued() -> None:
    ctx = _context(GPU_RUN)
    for job in (m.build_prep_job(ctx), m.build_finalize_job(ctx)):
        assert job["spec"]["suspend"] is False, job["metadata"]["name"]
        assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert m.build_train_job(ctx)["spec"]["suspend"] is True


def test_unqueued_jobs_are_not_suspended() -> None:
    job = m.build_train_job(_context(CPU_RUN))
    assert job["spec"]["suspend"] is False
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert "activeDeadlineSeconds" not in job["spec"]


def test_pull_policy_from_settings_unless_the_spec_sets_it() -> None:
    settings = OperatorSettings(image_pull_policy="Never")
    cpu = m.build_prep_job(_context(CPU_RUN, settings=settings))
    gpu = m.build_prep_job(_context(GPU_RUN, settings=settings))
    assert cpu["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "Never"
    assert gpu["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "Always"


@pytest.mark.parametrize(("name", "problem"), [
    ("ok-name", None),
    ("9starts-with-digit", "DNS-1035"),
    ("has.dots", "DNS-1035"),
    ("x" * 51, None),  # x...x-train-101-1 is 63 characters
    ("x" * 52, "too long"),
])
def test_name_problem(name: str, problem: str | None) -> None:
    found = m.name_problem(name, max_attempt=101, nodes=2)
    assert (found is None) if problem is None else (problem in found)


def test_no_storage_at_all_is_a_spec_problem() -> None:
    settings = OperatorSettings(storage_claim_name=None)
    run = parse_training_run(CPU_RUN)
    with pytest.raises(ResolveError) as error:
        resolve_config(run, settings)
    assert error.value.field == "spec.storage"


def test_gpus_are_requested_under_the_operators_resource_name_unless_the_run_names_one() -> None:
    amd = OperatorSettings(gpu_resource="amd.com/gpu")
    limits = m.build_train_job(_context(GPU_RUN, settings=amd))["spec"]["template"]["spec"][
        "containers"][0]["resources"]["limits"]
    assert limits["amd.com/gpu"] == "8" and "nvidia.com/gpu" not in limits
    own = {**GPU_RUN, "spec": {**GPU_RUN["spec"], "resources": {
        **GPU_RUN["spec"]["resources"], "gpuResourceName": "gpu.intel.com/i915"}}}
    limits = m.build_train_job(_context(own, settings=amd))["spec"]["template"]["spec"][
        "containers"][0]["resources"]["limits"]
    assert limits["gpu.intel.com/i915"] == "8" and "amd.com/gpu" not in limits
    assert OperatorSettings.from_env({"KUBETUNE_GPU_RESOURCE": "amd.com/gpu"}).gpu_resource == "amd.com/gpu"
    assert OperatorSettings.from_env({}).gpu_resource == "nvidia.com/gpu"
    with pytest.raises(ValueError, match="gpu_resource"):
        OperatorSettings.from_env({"KUBETUNE_GPU_RESOURCE": "nvidia gpu"})


def test_training_pods_are_told_to_train_on_cpu_only_where_gpus_are_a_stand_in() -> None:
    def env(settings: OperatorSettings) -> dict:
        container = m.build_train_job(_context(GPU_RUN, settings=settings))["spec"]["template"][
            "spec"]["containers"][0]
        return {item["name"]: item.get("value") for item in container["env"]}

    assert "KUBETUNE_CPU_FALLBACK" not in env(OperatorSettings())
    stand_in = OperatorSettings.from_env({"KUBETUNE_CPU_FALLBACK": "true"})
    assert env(stand_in)["KUBETUNE_CPU_FALLBACK"] == "1"
    assert OperatorSettings.from_env({"KUBETUNE_CPU_FALLBACK": "false"}).cpu_fallback is False


def test_settings_from_env() -> None:
    settings = OperatorSettings.from_env({
        "KUBETUNE_TRAINER_IMAGE": "img:2",
        "KUBETUNE_TRAINER_COMMAND": "/opt/py -m kubetune_trainer",
        "KUBETUNE_TORCHRUN_COMMAND": '["/opt/torchrun", "--no-python"]',
        "KUBETUNE_METRICS_PORT": "9500",
        "KUBETUNE_STORAGE_CLAIM_NAME": "",
        "KUBETUNE_STORAGE_URI": "/srv/kubetune",
        "UNRELATED": "x",
    })
    assert settings.trainer_image == "img:2"
    assert settings.trainer_command == ["/opt/py", "-m", "kubetune_trainer"]
    assert settings.torchrun_command == ["/opt/torchrun", "--no-python"]
    assert settings.metrics_port == 9500
    assert settings.storage_claim_name is None and settings.storage_uri == "/srv/kubetune"
    assert OperatorSettings.from_env({}).trainer_image.startswith("ghcr.io/kubetune/trainer:")
    with pytest.raises(ValueError):
        OperatorSettings.from_env({"KUBETUNE_METRICS_PORT": "0"})


def test_every_name_of_a_valid_run_fits_whatever_its_attempts_and_nodes() -> None:
    """The API's limit on run names is derived from the children's names at the API's bounds."""
    from kubetune.names import MAX_BACKOFF_LIMIT, MAX_NODES, MAX_RUN_NAME_LENGTH

    longest = "x" * MAX_RUN_NAME_LENGTH
    assert m.name_problem(longest, max_attempt=MAX_BACKOFF_LIMIT + 1, nodes=MAX_NODES) is None
    assert m.name_problem(longest + "x", max_attempt=MAX_BACKOFF_LIMIT + 1, nodes=MAX_NODES)
    with pytest.raises(ValueError, match="default_backoff_limit"):  # the operator's default too
        OperatorSettings(default_backoff_limit=MAX_BACKOFF_LIMIT + 1)
