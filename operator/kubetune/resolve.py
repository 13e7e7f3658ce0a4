"""TrainingRun + operator settings → the trainer's `RunConfig` (pure).

Every default that depends on where the run lives (storage root, MLflow server, owner) is filled
in here, once, so the trainer never guesses and the ConfigMap snapshot is complete.
"""

from __future__ import annotations

from kubetune_trainer.config import Distributed, RunConfig

from .api import TrainingRun
from .settings import OperatorSettings


class ResolveError(ValueError):
    """The run cannot be turned into a config; `field` names the spec field to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def storage_root(run: TrainingRun, settings: OperatorSettings) -> str:
    """Where this operator's runs keep their files, as the trainer pods see it."""
    storage = run.spec.storage
    if storage.pvc is not None:
        return settings.storage_mount_path
    if storage.uri:
        return storage.uri.rstrip("/")
    if settings.storage_uri:
        return settings.storage_uri.rstrip("/")
    if settings.storage_claim_name:
        return settings.storage_mount_path
    raise ResolveError("spec.storage", "spec.storage: no PVC or URI given and the operator has "
                       "no default storage (KUBETUNE_STORAGE_CLAIM_NAME or KUBETUNE_STORAGE_URI)")


def storage_claim(run: TrainingRun, settings: OperatorSettings) -> tuple[str, str | None] | None:
    """(claim name, subPath) of the PVC to mount, or None when storage is a URI."""
    storage = run.spec.storage
    if storage.pvc is not None:
        return storage.pvc.claim_name, storage.pvc.sub_path
    if storage.uri or settings.storage_uri:
        return None
    return (settings.storage_claim_name, None) if settings.storage_claim_name else None


def backoff_limit(run: TrainingRun, settings: OperatorSettings) -> int:
    """Restarts of all ranks allowed: the spec's when written there, else the operator's default."""
    if "backoff_limit" in run.spec.model_fields_set:
        return run.spec.backoff_limit
    return settings.default_backoff_limit


def distributed(run: TrainingRun) -> Distributed:
    resources = run.spec.resources
    total_gpus = resources.nodes * resources.gpus_per_node
    return Distributed(nodes=resources.nodes, procs_per_node=resources.processes(),
                       gpus_per_node=resources.gpus_per_node, fsdp=total_gpus > 1)


def resolve_config(run: TrainingRun, settings: OperatorSettings) -> RunConfig:
    spec, meta = run.spec, run.metadata
    run_owner = run.owner_by(settings.owner_annotation)
    return RunConfig(
        run_name=meta.name,
        run_uid=meta.uid or "",
        namespace=meta.namespace,
        owner=run_owner,
        task_type=spec.task_type,
        model=spec.model,
        train_data_path=spec.train_data_path,
        eval_data_path=spec.eval_data_path,
        eval_prompts=list(spec.eval_prompts),
        custom_weights_path=spec.custom_weights_path,
        training_duration=spec.training_duration,
        learning_rate=spec.resolved_learning_rate(),
        context_length=spec.resolved_context_length(),
        global_batch_size=spec.global_batch_size,
        work_dir=f"{storage_root(run, settings)}/{meta.namespace}/{meta.name}",
        mlflow_tracking_uri=spec.mlflow.tracking_uri or settings.mlflow_tracking_uri,
        experiment_path=spec.resolved_experiment_path(run_owner, meta.name),
        register_to=run.register_name(),
        distributed=distributed(run),
        prep_workers=spec.data_prep.parallelism,
        max_record_bytes=spec.data_prep.max_record_bytes,
        validate_inputs=spec.validate_inputs,
        metrics_port=settings.metrics_port,
    )
