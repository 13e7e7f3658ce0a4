"""kubetune's SDK: the managed service's `foundation_model` API over TrainingRuns.

Code written for the service runs with one line changed::

    from kubetune import foundation_model as fm   # was: from databricks.model_training import ...

    run = fm.create(model="meta-llama/Llama-3.2-1B-Instruct",
                    train_data_path="s3://bucket/train.jsonl", register_to="main.ml")
    fm.get_events(run, follow=True)

It talks to the Kubernetes API with the current kubeconfig context (or the pod's ServiceAccount).
The errors a user can cause are `NoClusterError`, `CrdNotInstalledError`, `PermissionDeniedError`,
`RunNotFoundError` and `InvalidArgumentsError`, all `FoundationModelError`s. See docs/sdk.md.
"""

from .errors import (
    CrdNotInstalledError,
    FoundationModelError,
    InvalidArgumentsError,
    NoClusterError,
    PermissionDeniedError,
    RunNotFoundError,
)
from .runs import cancel, create, delete, get, get_checkpoints, get_events, get_models, list  # noqa: A004
from .types import ObjectList, RunStatus, TrainingEvent, TrainingModelConstants, TrainingRun

__all__ = [
    "cancel", "create", "delete", "get", "get_checkpoints", "get_events", "get_models", "list",
    "RunStatus", "TrainingEvent", "TrainingModelConstants", "TrainingRun", "ObjectList",
    "FoundationModelError", "NoClusterError", "CrdNotInstalledError", "PermissionDeniedError",
    "RunNotFoundError", "InvalidArgumentsError",
]
