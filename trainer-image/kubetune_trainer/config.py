"""The resolved run config: the one contract between the operator and the trainer steps.

The operator (or `kubetune run --local`) renders it from a TrainingRun and hands it to every
step as a JSON file (`--config`). It holds no secrets: credentials reach the pods as environment
variables from Secret references. Pure pydantic, no torch, so the operator can import it.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .contract import PROGRESS_FILE

DEFAULT_MAX_CONTEXT = 8192
DEFAULT_MAX_RECORD_BYTES = 8 * 2**20  # one JSONL line or .txt file; a larger one is refused unread


def is_object_store(uri: str) -> bool:
    """An object-store URI (s3://...); `file://` and plain paths are mounted storage, used in place."""
    return "://" in uri and not uri.startswith("file://")


class TaskType(str, Enum):
    INSTRUCTION_FINETUNE = "INSTRUCTION_FINETUNE"
    CHAT_COMPLETION = "CHAT_COMPLETION"
    CONTINUED_PRETRAIN = "CONTINUED_PRETRAIN"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Distributed(Strict):
    """How many processes train; the launcher sets ranks, the operator sets the rest."""

    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0  # 0: CPU with gloo; >0: CUDA, bf16, NCCL
    fsdp: bool = False  # shard parameters across ranks (large models on GPUs)


class RunConfig(Strict):
    run_name: str
    run_uid: str
    namespace: str = "default"
    owner: str = "default"

    task_type: TaskType = TaskType.INSTRUCTION_FINETUNE
    model: str  # hub id or local/mounted folder
    train_data_path: str
    eval_data_path: str | None = None
    eval_prompts: list[str] = Field(default_factory=list)
    custom_weights_path: str | None = None

    training_duration: str = "1ep"  # Nep | Ntok | Nba
    learning_rate: float = 5e-7
    context_length: int | None = None  # None: min(8192, model max), resolved by the trainer
    global_batch_size: int = 16
    seed: int = 17
    save_interval: str = "1ep"  # Composer time string; a final checkpoint is always saved

    work_dir: str  # this run's storage root: data/, checkpoints/, hf/, result/
    # Set in-process by the storage layer while a step runs on a local staging copy of an
    # object-store work_dir: the URI that copy mirrors (see storage.py). Never serialized.
    remote_work_dir: str | None = Field(default=None, exclude=True)
    mlflow_tracking_uri: str | None = None  # None: the MLFLOW_TRACKING_URI env var, else ./mlruns
    experiment_path: str
    register_to: str  # full registered model name: catalog.schema.name

    distributed: Distributed = Field(default_factory=Distributed)
    validate_inputs: bool = True  # pre-flight checks of inputs later steps read (customWeightsPath)
    prep_workers: int = 1  # dataPrep.parallelism: prepare pods (shards); each uses all its CPUs
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_reported_errors: int = 20
    metrics_port: int = 9400  # rank 0 serves progress here (Prometheus text format)

    # Storage layout under work_dir, the same for every step.
    def path(self, *parts: str) -> str:
        return "/".join([self.work_dir.rstrip("/"), *parts])

    def published(self, path: str) -> str:
        """`path` as readers outside this pod see it: the object-store URI of a staged file."""
        root = self.work_dir.rstrip("/")
        if self.remote_work_dir and (path == root or path.startswith(root + "/")):
            return self.remote_work_dir.rstrip("/") + path[len(root):]
        return path

    def storage_uri(self, path: str) -> str:
        """`path` (under work_dir) as a URI for records outside this pod: status, MLflow."""
        published = self.published(path)
        return published if "://" in published else Path(published).resolve().as_uri()

    @property
    def data_dir(self) -> str:
        return self.path("data")

    @property
    def checkpoint_dir(self) -> str:
        return self.path("checkpoints")

    @property
    def hf_dir(self) -> str:
        return self.path("hf")

    @property
    def result_dir(self) -> str:
        return self.path("result")

    @property
    def progress_file(self) -> str:
        return self.path(PROGRESS_FILE)


def load_config(path: str | Path) -> RunConfig:
    return RunConfig.model_validate(json.loads(Path(path).read_text()))


def dump_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(config.model_dump_json(indent=2))
