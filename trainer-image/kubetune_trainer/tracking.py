"""The MLflow names the train and register steps share: the tags that identify a TrainingRun's
MLflow records, and the tracking server both write to."""

from __future__ import annotations

from .config import RunConfig

RUN_UID_TAG = "kubetune.run_uid"  # the one a retried step finds its records by
RUN_NAME_TAG = "kubetune.run_name"
NAMESPACE_TAG = "kubetune.namespace"


def tracking_uri(config: RunConfig) -> str:
    """The spec's tracking URI, else the MLFLOW_TRACKING_URI variable, else MLflow's default."""
    import mlflow

    return config.mlflow_tracking_uri or mlflow.get_tracking_uri()
