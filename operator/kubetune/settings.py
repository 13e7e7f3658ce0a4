"""Operator-wide configuration, read once from `KUBETUNE_*` environment variables.

Everything a TrainingRun may leave out (image, storage, MLflow server) has its default here, so
the builders and `decide` get one frozen object instead of reading the environment themselves.
Each field `foo_bar` is set by `KUBETUNE_FOO_BAR`; list fields take a JSON array or a
shell-quoted string (`KUBETUNE_TRAINER_COMMAND="python -m kubetune_trainer"`).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .api import MAX_EVENTS, OWNER_ANNOTATION, RESOURCE_NAME_PATTERN
from .names import MAX_BACKOFF_LIMIT

ENV_PREFIX = "KUBETUNE_"


def operator_version() -> str:
    try:
        return metadata.version("kubetune")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0.1.0"


class OperatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Trainer image and how its steps are started (tests point these at a local interpreter).
    trainer_image: str = Field(default_factory=lambda: f"ghcr.io/kubetune/trainer:{operator_version()}")
    image_pull_policy: str = "IfNotPresent"
    trainer_command: list[str] = ["python", "-m", "kubetune_trainer"]
    torchrun_command: list[str] = ["torchrun"]
    trainer_module: str = "kubetune_trainer"  # what torchrun runs with `-m`
    # The ServiceAccount of the run's pods (the Helm chart makes one with no rights); None: the
    # namespace's default. Their token is never mounted either way.
    trainer_service_account: str | None = None

    # Default storage when a run names none: a URI / host path if set, else a PVC mounted in
    # every pod (an empty KUBETUNE_STORAGE_CLAIM_NAME clears it).
    storage_claim_name: str | None = "kubetune-storage"
    storage_mount_path: str = "/mnt/kubetune"
    storage_uri: str | None = None

    # The extended resource GPUs are requested under when a run names none (amd.com/gpu, ...).
    gpu_resource: str = Field(default="nvidia.com/gpu", max_length=253, pattern=RESOURCE_NAME_PATTERN)
    # True where that resource is a stand-in with no CUDA device behind it (test clusters): the
    # training pods then run on CPU instead of failing NoCUDADevice.
    cpu_fallback: bool = False
    mlflow_tracking_uri: str | None = None
    metrics_port: int = Field(default=9400, ge=1, le=65535)
    master_port: int = Field(default=29500, ge=1, le=65535)
    config_mount_path: str = "/etc/kubetune"

    # When a run's spec has none; bounded as the spec's is, so every attempt's pods get names.
    default_backoff_limit: int = Field(default=3, ge=0, le=MAX_BACKOFF_LIMIT)
    finalize_backoff_limit: int = Field(default=2, ge=0)  # pod retries inside the finalize Job
    prep_backoff_limit: int = Field(default=2, ge=0)  # pod retries inside the data-prep Job
    events_cap: int = Field(default=MAX_EVENTS, ge=1, le=MAX_EVENTS)  # the CRD's maxItems
    progress_interval_seconds: float = Field(default=30.0, gt=0)
    owner_annotation: str = OWNER_ANNOTATION
    cancel_annotation: str = "kubetune.dev/cancel"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            values[name] = _parse_list(raw) if field.annotation == list[str] else (raw or None)
        return cls.model_validate(values)

    @property
    def config_file(self) -> str:
        return f"{self.config_mount_path.rstrip('/')}/config.json"


def _parse_list(raw: str) -> list[str]:
    text = raw.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"expected a JSON array of strings, got {raw!r}")
        return value
    return shlex.split(text)
