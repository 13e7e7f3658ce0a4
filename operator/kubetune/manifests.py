"""Pure builders: one frozen `BuildContext` → the child manifests of a TrainingRun.

Children and their deterministic names:

- ConfigMap `<run>-config`: the run's snapshot (`snapshot.py`: the resolved `RunConfig` and
  the spec it started with), immutable, built once; every other child is built from it.
- Job `<run>-prep`: data preparation, CPU only.
- Service `<run>-train`: headless, gives every training pod a stable DNS name.
- Indexed Job `<run>-train-<attempt>`: one pod per node. The attempt is in the name so a retry
  creates its Job while the failed one is still being torn down, and so pods of two attempts
  never share a hostname (`<run>-train-<attempt>-<index>.<run>-train`).
- Job `<run>-finalize`: conversion and registration, CPU only.

Every pod meets Pod Security `restricted`; secrets only ever reach pods as references.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from kubetune_trainer.config import RunConfig, is_object_store
from kubetune_trainer.contract import (
    ENV_HF_HOME,
    ENV_HF_TOKEN,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_NNODES,
    ENV_NODE_RANK,
    ENV_NPROC_PER_NODE,
    ENV_POD_IP,
    ENV_PREP_SHARD,
    ENV_PREP_SHARDS,
    ENV_CPU_FALLBACK,
    ENV_SCRATCH_DIR,
    EXIT_PERMANENT,
)

from .api import API_VERSION, GROUP, KIND, TrainingRun
from .resolve import storage_claim
from .names import (  # noqa: F401 (the builders' names, also used by their callers from here)
    cleanup_job_name,
    config_map_name,
    finalize_job_name,
    name_problem,
    prep_job_name,
    rank_hostname,
    service_name,
    train_job_name,
)
from .settings import OperatorSettings
from .snapshot import snapshot_data


LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = f"{GROUP}/run"
LABEL_COMPONENT = f"{GROUP}/component"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on its pods by the Job controller

RUN_AS_USER = 1000


class Component(str, Enum):
    CONFIG = "config"
    PREP = "prep"
    TRAIN = "train"
    FINALIZE = "finalize"
    CLEANUP = "cleanup"


# --- context ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildContext:
    """Everything a builder may depend on. `config` is the run's snapshot (the ConfigMap's)."""

    run: TrainingRun
    settings: OperatorSettings
    config: RunConfig
    attempt: int = 1

    @property
    def name(self) -> str:
        return self.run.metadata.name

    @property
    def namespace(self) -> str:
        return self.run.metadata.namespace

    @property
    def queued(self) -> bool:
        """Kueue admits a Job by un-suspending it, so the queued (training) Job is created
        suspended."""
        return bool(self.run.spec.scheduling.queue_name)


def labels(ctx: BuildContext, component: Component, *, attempt: bool = False) -> dict[str, str]:
    result = {LABEL_NAME: "kubetune", LABEL_MANAGED_BY: "kubetune", LABEL_RUN: ctx.name,
              LABEL_COMPONENT: component.value}
    if attempt:  # training Jobs and their pods; the Service outlives attempts
        result[LABEL_ATTEMPT] = str(ctx.attempt)
    return result


def selector(run_name: str, component: Component | None = None) -> dict[str, str]:
    """Label selector of a run's children (all of them, or one component's)."""
    result = {LABEL_RUN: run_name}
    if component is not None:
        result[LABEL_COMPONENT] = component.value
    return result


def owner_reference(run: TrainingRun) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": run.metadata.name,
            "uid": run.metadata.uid or "", "controller": True, "blockOwnerDeletion": True}


def _metadata(ctx: BuildContext, name: str, component: Component,
              extra_labels: dict[str, str] | None = None, *, attempt: bool = False) -> dict[str, Any]:
    return {"name": name, "namespace": ctx.namespace,
            "labels": {**labels(ctx, component, attempt=attempt), **(extra_labels or {})},
            "ownerReferences": [owner_reference(ctx.run)]}


# --- config map and service ------------------------------------------------------------------

def build_config_map(ctx: BuildContext) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ctx, config_map_name(ctx.name), Component.CONFIG),
        "immutable": True,  # the snapshot: later edits of the run never reach its children
        "data": snapshot_data(ctx.config, ctx.run.spec.model_dump(by_alias=True, exclude_unset=True,
                                                                   mode="json")),
    }


def build_service(ctx: BuildContext) -> dict[str, Any]:
    port = ctx.settings.master_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ctx, service_name(ctx.name), Component.TRAIN),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # ranks resolve each other before any is ready
            "selector": selector(ctx.name, Component.TRAIN),
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


# --- containers ------------------------------------------------------------------------------

def _quantities(cpu: str | None, memory: str | None, gpus: int = 0,
                gpu_resource: str = "") -> dict[str, Any]:
    # CPU gets a request, no limit (limits throttle data loaders); memory and GPUs are fixed.
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    limits = {"memory": memory} if memory else {}
    if gpus:
        requests[gpu_resource] = limits[gpu_resource] = str(gpus)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _secret_env(ctx: BuildContext) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, envFrom) that reference the run's secrets; values never pass through the operator."""
    secrets = ctx.run.spec.secrets
    env: list[dict[str, Any]] = []
    env_from: list[dict[str, Any]] = []
    if secrets.hf_token is not None:
        env.append({"name": ENV_HF_TOKEN, "valueFrom": {"secretKeyRef": {
            "name": secrets.hf_token.name, "key": secrets.hf_token.key}}})
    for ref in (secrets.mlflow, secrets.object_store):
        if ref is not None:
            env_from.append({"secretRef": {"name": ref.name}})
    return env, env_from


def _base_env(ctx: BuildContext) -> list[dict[str, Any]]:
    env = [{"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
           {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if storage_claim(ctx.run, ctx.settings) is not None:
        # One hub download per model on the shared volume, not one per pod and attempt.
        cache = f"{ctx.settings.storage_mount_path}/.cache/huggingface"
        env.append({"name": ENV_HF_HOME, "value": cache})
    elif is_object_store(ctx.config.work_dir):
        # Steps work on a local copy of the object-store work_dir, in the pod's /tmp emptyDir.
        env.append({"name": ENV_SCRATCH_DIR, "value": "/tmp/kubetune-stage"})
    return env


def _image(ctx: BuildContext) -> tuple[str, str]:
    image = ctx.run.spec.image
    # The spec's pull policy has a default; only one the user wrote beats the operator's.
    explicit = "pull_policy" in image.model_fields_set
    policy = image.pull_policy.value if explicit else ctx.settings.image_pull_policy
    return image.trainer or ctx.settings.trainer_image, policy


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True, "runAsNonRoot": True, "runAsUser": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _volume_mounts(ctx: BuildContext, shared_memory: bool) -> list[dict[str, Any]]:
    mounts = [{"name": "config", "mountPath": ctx.settings.config_mount_path, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"}]
    claim = storage_claim(ctx.run, ctx.settings)
    if claim is not None:
        mount = {"name": "storage", "mountPath": ctx.settings.storage_mount_path}
        if claim[1]:
            mount["subPath"] = claim[1]
        mounts.append(mount)
    if shared_memory:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return mounts


def _container(ctx: BuildContext, step: str, command: list[str], resources: dict[str, Any], *,
               env: Sequence[dict[str, Any]] = (), ports: Sequence[dict[str, Any]] = (),
               shared_memory: bool = False) -> dict[str, Any]:
    image, pull_policy = _image(ctx)
    secret_env, env_from = _secret_env(ctx)
    container: dict[str, Any] = {
        "name": step,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": command,
        "env": [*_base_env(ctx), *env, *secret_env],
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": _volume_mounts(ctx, shared_memory),
        # The step's JSON result; the log tail when it died before writing one.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env_from:
        container["envFrom"] = env_from
    if ports:
        container["ports"] = list(ports)
    return container


def _step_command(ctx: BuildContext, step: str) -> list[str]:
    return [*ctx.settings.trainer_command, step, "--config", ctx.settings.config_file]


def _train_command(ctx: BuildContext) -> list[str]:
    dist = ctx.config.distributed
    if dist.nodes * dist.procs_per_node == 1:
        return _step_command(ctx, "train")
    # $(VAR) is expanded by the kubelet from the container's env.
    return [*ctx.settings.torchrun_command,
            "--nnodes", f"$({ENV_NNODES})", "--nproc-per-node", f"$({ENV_NPROC_PER_NODE})",
            "--node-rank", f"$({ENV_NODE_RANK})", "--master-addr", f"$({ENV_MASTER_ADDR})",
            "--master-port", f"$({ENV_MASTER_PORT})",
            "-m", ctx.settings.trainer_module, "train", "--config", ctx.settings.config_file]


def _rendezvous_env(ctx: BuildContext) -> list[dict[str, Any]]:
    dist = ctx.config.distributed
    master = f"{rank_hostname(ctx.name, ctx.attempt, 0)}.{service_name(ctx.name)}.{ctx.namespace}.svc"
    index_path = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
    return [
        {"name": ENV_NNODES, "value": str(dist.nodes)},
        {"name": ENV_NPROC_PER_NODE, "value": str(dist.procs_per_node)},
        {"name": ENV_NODE_RANK, "valueFrom": {"fieldRef": {"fieldPath": index_path}}},
        {"name": ENV_MASTER_ADDR, "value": master},
        {"name": ENV_MASTER_PORT, "value": str(ctx.settings.master_port)},
        {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        *([{"name": ENV_CPU_FALLBACK, "value": "1"}] if ctx.settings.cpu_fallback else []),
    ]


# --- pods and jobs ---------------------------------------------------------------------------

def _volumes(ctx: BuildContext, shared_memory: bool) -> list[dict[str, Any]]:
    volumes = [{"name": "config", "configMap": {"name": config_map_name(ctx.name)}},
               {"name": "tmp", "emptyDir": {}}]
    claim = storage_claim(ctx.run, ctx.settings)
    if claim is not None:
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": claim[0]}})
    if shared_memory:
        size = ctx.run.spec.resources.shared_memory
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}})
    return volumes


def _scheduling(ctx: BuildContext) -> dict[str, Any]:
    scheduling = ctx.run.spec.scheduling
    result: dict[str, Any] = {}
    if scheduling.node_selector:
        result["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        result["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True, mode="json")
                                 for t in scheduling.tolerations]
    if scheduling.priority_class_name:
        result["priorityClassName"] = scheduling.priority_class_name
    return result


def _pod_template(ctx: BuildContext, component: Component, container: dict[str, Any], *,
                  shared_memory: bool = False, subdomain: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the steps never talk to the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER,
                            "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": _volumes(ctx, shared_memory),
        **_scheduling(ctx),
    }
    if ctx.settings.trainer_service_account:
        spec["serviceAccountName"] = ctx.settings.trainer_service_account
    if subdomain:
        spec["subdomain"] = subdomain
    pod_labels = labels(ctx, component, attempt=component is Component.TRAIN)
    return {"metadata": {"labels": pod_labels}, "spec": spec}


def _retry_policy(container_name: str) -> dict[str, Any]:
    """Pod retries inside a Job: never for user errors, and preemption does not count."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": container_name, "operator": "In",
                                              "values": [EXIT_PERMANENT]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def _job(ctx: BuildContext, name: str, component: Component, template: dict[str, Any],
         job_spec: dict[str, Any]) -> dict[str, Any]:
    # Only the training step waits for the queue's quota (GPUs): prepare and finalize are CPU
    # work, and a queued prepare would hold a run back behind others' training for nothing.
    queued = ctx.queued and component is Component.TRAIN
    extra_labels = {LABEL_QUEUE: ctx.run.spec.scheduling.queue_name} if queued else None
    spec = {**job_spec, "suspend": queued, "template": template}
    if ctx.run.spec.active_deadline_seconds:
        # A backstop should the operator be down; the operator enforces the run's deadline.
        spec["activeDeadlineSeconds"] = ctx.run.spec.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": _metadata(ctx, name, component, extra_labels,
                                  attempt=component is Component.TRAIN),
            "spec": spec}


def _shard_env(shards: int) -> list[dict[str, Any]]:
    index_path = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
    return [{"name": ENV_PREP_SHARD, "valueFrom": {"fieldRef": {"fieldPath": index_path}}},
            {"name": ENV_PREP_SHARDS, "value": str(shards)}]


def build_prep_job(ctx: BuildContext) -> dict[str, Any]:
    prep = ctx.run.spec.data_prep
    shards = prep.parallelism  # > 1: one pod per shard of the records; pod 0 merges them
    container = _container(ctx, "prepare", _step_command(ctx, "prepare"),
                           _quantities(prep.resources.cpu, prep.resources.memory),
                           env=_shard_env(shards) if shards > 1 else ())
    template = _pod_template(ctx, Component.PREP, container)
    indexed = {"completionMode": "Indexed", "completions": shards, "parallelism": shards} if shards > 1 else {}
    return _job(ctx, prep_job_name(ctx.name), Component.PREP, template,
                {**indexed, "backoffLimit": ctx.settings.prep_backoff_limit,
                 "podFailurePolicy": _retry_policy("prepare")})


def build_train_job(ctx: BuildContext) -> dict[str, Any]:
    resources = ctx.run.spec.resources
    nodes = ctx.config.distributed.nodes
    metrics = {"name": "metrics", "containerPort": ctx.settings.metrics_port, "protocol": "TCP"}
    container = _container(
        ctx, "train", _train_command(ctx),
        _quantities(resources.cpu, resources.memory, resources.gpus_per_node,
                    resources.gpu_resource_name or ctx.settings.gpu_resource),
        env=_rendezvous_env(ctx), ports=[metrics], shared_memory=True)
    template = _pod_template(ctx, Component.TRAIN, container, shared_memory=True,
                             subdomain=service_name(ctx.name))
    if nodes > 1:
        template["spec"]["affinity"] = _one_rank_per_node(ctx)
    return _job(ctx, train_job_name(ctx.name, ctx.attempt), Component.TRAIN, template, {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,  # one rank failing fails the attempt; the operator restarts all ranks
    })


def _one_rank_per_node(ctx: BuildContext) -> dict[str, Any]:
    """Ranks of one attempt prefer different nodes: a rank is a node's worth of training, and two
    sharing one split its CPUs, memory and network (whole-node GPU requests spread them anyway;
    preferred, so a small cluster still runs a CPU run's ranks side by side)."""
    ranks = labels(ctx, Component.TRAIN, attempt=True)
    match = {key: ranks[key] for key in (LABEL_RUN, LABEL_COMPONENT, LABEL_ATTEMPT)}
    term = {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": match}}
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": term}]}}


def build_finalize_job(ctx: BuildContext) -> dict[str, Any]:
    resources = ctx.run.spec.resources
    container = _container(ctx, "finalize", _step_command(ctx, "finalize"),
                           _quantities(resources.cpu, resources.memory))
    template = _pod_template(ctx, Component.FINALIZE, container)
    return _job(ctx, finalize_job_name(ctx.name), Component.FINALIZE, template,
                {"backoffLimit": ctx.settings.finalize_backoff_limit,
                 "podFailurePolicy": _retry_policy("finalize")})


def build_cleanup_job(ctx: BuildContext) -> dict[str, Any]:
    """Removes a deleted run's work_dir (`kubetune.deletion`). Not owned by the run, so a
    foreground deletion does not take it with the run's children; never queued; no config
    volume (the run's ConfigMap may be gone): the folder is its only argument."""
    command = [*ctx.settings.trainer_command, "cleanup", "--work-dir", ctx.config.work_dir]
    container = _container(ctx, "cleanup", command, {})
    # Nor /tmp: it writes nothing of its own (and the test node agent would rewrite a /tmp path).
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] not in ("config", "tmp")]
    template = _pod_template(ctx, Component.CLEANUP, container)
    template["spec"]["volumes"] = [v for v in template["spec"]["volumes"] if v["name"] not in ("config", "tmp")]
    metadata = {"name": cleanup_job_name(ctx.name), "namespace": ctx.namespace,
                "labels": labels(ctx, Component.CLEANUP)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
            "spec": {"backoffLimit": 2, "ttlSecondsAfterFinished": 3600, "template": template}}
