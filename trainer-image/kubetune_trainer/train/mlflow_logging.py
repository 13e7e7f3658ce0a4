"""The run's MLflow record: metrics and hyper-parameters (Composer's MLFlowLogger), the run's
identity (tag `kubetune.run_uid`) and where its checkpoints are, so a later run can find them.

A retried or resumed attempt continues the same MLflow run: Composer's logger resumes the run
tagged with the Composer run name, which embeds the TrainingRun's uid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from composer.core import Callback, State
from composer.loggers import Logger, MLFlowLogger

from .. import checkpoints
from ..config import RunConfig
from ..contract import MLFLOW_EXPERIMENT_ID, MLFLOW_RUN_ID
from ..tracking import NAMESPACE_TAG, RUN_NAME_TAG, RUN_UID_TAG, tracking_uri

CHECKPOINT_FOLDER_TAG = "kubetune.checkpoint_folder"
LATEST_CHECKPOINT_TAG = "kubetune.latest_checkpoint"
CHECKPOINT_INDEX = "kubetune/checkpoints.json"


def composer_run_name(config: RunConfig) -> str:
    """Stable across attempts (autoresume needs that), unique across re-created runs."""
    return f"{config.run_name}-{config.run_uid}"


def mlflow_logger(config: RunConfig, system_metrics: bool) -> MLFlowLogger:
    tags = {RUN_UID_TAG: config.run_uid, RUN_NAME_TAG: config.run_name,
            NAMESPACE_TAG: config.namespace, CHECKPOINT_FOLDER_TAG: config.storage_uri(config.checkpoint_dir)}
    return MLFlowLogger(experiment_name=config.experiment_path, run_name=config.run_name,
                        tracking_uri=tracking_uri(config), tags=tags, resume=True,
                        log_system_metrics=system_metrics,
                        # MLflow params are immutable: a retry on another node must not change one
                        ignore_hyperparameters=["node_name"])


def active_run_ids() -> tuple[str, str]:
    """(experiment id, run id) of the run the logger started (rank 0, after the Trainer's init)."""
    import mlflow

    info = mlflow.active_run().info
    return info.experiment_id, info.run_id


def hyperparameters(config: RunConfig, context_length: int, world_size: int) -> dict[str, Any]:
    return {"model": config.model, "task_type": config.task_type.value,
            "training_duration": config.training_duration, "learning_rate": config.learning_rate,
            "optimizer": "DecoupledLionW", "betas": "0.99,0.95", "weight_decay": 0.0,
            "schedule": "linear warmup 2% then linear decay to 0",
            "global_batch_size": config.global_batch_size,
            "context_length": context_length, "world_size": world_size, "seed": config.seed,
            "custom_weights_path": config.custom_weights_path or ""}


def mark_failed(run_id: str, uri: str) -> None:
    """Composer's logger ends even a crashed run as FINISHED (mlflow.end_run's default status)."""
    from mlflow import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status="FAILED")


class RunRecord(Callback):
    """Rank 0: the MLflow run's ids and hyper-parameters, and a record of each new checkpoint: a
    tag with the latest one and a small JSON artifact listing every checkpoint by URI and size
    (references, not copies: they are large and already on shared storage).

    The ids are known at Composer's INIT event, after the MLflow logger (Composer runs loggers
    before callbacks) started or resumed the run; `progress`, if given, is told them."""

    def __init__(self, config: RunConfig, hyperparameters: dict[str, Any], progress: Any = None):
        self.uri, self.folder = tracking_uri(config), Path(config.checkpoint_dir)
        self.locate: Callable[[str], str] = config.storage_uri  # the URI readers use (the object store's)
        self.hyperparameters, self.progress = hyperparameters, progress
        self.ids: dict[str, str | None] = {MLFLOW_EXPERIMENT_ID: None, MLFLOW_RUN_ID: None}

    def init(self, state: State, logger: Logger) -> None:
        self.ids[MLFLOW_EXPERIMENT_ID], self.ids[MLFLOW_RUN_ID] = active_run_ids()
        logger.log_hyperparameters(self.hyperparameters)
        if self.progress is not None:
            self.progress.set_mlflow(self.ids[MLFLOW_EXPERIMENT_ID], self.ids[MLFLOW_RUN_ID])

    def __call__(self, checkpoint: str) -> None:
        from mlflow import MlflowClient

        client, run_id = MlflowClient(self.uri), self.ids[MLFLOW_RUN_ID]
        client.set_tag(run_id, LATEST_CHECKPOINT_TAG, self.locate(checkpoint))
        client.log_dict(run_id, self.index(checkpoint), CHECKPOINT_INDEX)

    def index(self, latest: str) -> dict[str, Any]:
        files = [{"uri": self.locate(str(p)), "bytes": size(p)} for p in reversed(checkpoints.listed(self.folder))]
        return {"folder": self.locate(str(self.folder)), "latest": self.locate(latest), "checkpoints": files}


def size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
