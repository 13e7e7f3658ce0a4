"""The TrainingRun API (`kubetune.dev/v1alpha1`): pydantic models of the spec and the status.

This module is the single source of truth for the resource: the operator, the SDK and
`kubetune validate` parse with it, and `kubetune.crdgen` generates `crds/` from it. Every rule
lives here once: the Python check and, where CEL can express it, the CRD rule (`Cel` markers)
side by side, so the API server and the operator reject the same objects with the same words.

Parse a resource with `parse_training_run(body)`; a problem raises `SpecError`, whose lines
name the field (`spec.resources.nodes: ...`).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal, get_args

from kubetune_trainer.config import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_RECORD_BYTES, TaskType
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from kubetune import models_catalog
from kubetune.durations import DURATION_PATTERN
from kubetune.names import MAX_BACKOFF_LIMIT, MAX_NODES, MAX_RUN_NAME_LENGTH

__all__ = [
    "API_VERSION", "GROUP", "KIND", "MAX_CONTEXT_LENGTH", "MAX_EVENTS", "OWNER_ANNOTATION",
    "PLURAL", "SHORT_NAME", "SINGULAR", "TERMINAL", "VERSION",
    "DEFAULT_LEARNING_RATE", "DEFAULT_LEARNING_RATE_405B", "MAX_RUN_NAME_LENGTH", "RUN_NAME_PATTERN",
    "ComputeResources", "Condition", "DataPrep", "DataStats", "EventType", "Image", "MlflowInfo", "MlflowSpec",
    "ObjectMeta", "Phase", "Problem", "Progress", "PullPolicy", "PvcRef", "RegisteredModel",
    "Resources", "Resume", "RunEvent", "Scheduling", "SecretKeyRef", "SecretRef", "Secrets", "SpecError",
    "Storage", "TaskType", "Toleration", "TrainingRun", "TrainingRunSpec", "TrainingRunStatus",
    "data_path_problem", "parse_spec", "parse_training_run",
]

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingRun"
PLURAL = "trainingruns"
SINGULAR = "trainingrun"
SHORT_NAME = "tr"
OWNER_ANNOTATION = "kubetune.dev/owner"

# Children are named after the run; the longest name is a training pod's hostname
# `<run>-train-<attempt>-<index>`, a DNS label of at most 63 characters. With backoffLimit <= 100
# and nodes <= 1024 its suffix is at most len("-train-101-1023") = 15, leaving 48.
RUN_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_RUN_NAME_LENGTH = 48
RUN_NAME_RULE = (
    f"metadata.name must start with a letter, hold only a-z, 0-9 and '-', and be at most"
    f" {MAX_RUN_NAME_LENGTH} characters (kubetune names the run's Jobs and Services after it)"
)

MAX_CONTEXT_LENGTH = 131072
MAX_EVENTS = 50
DEFAULT_LEARNING_RATE = 5e-7
DEFAULT_LEARNING_RATE_405B = 1e-5

# Patterns are written in the common subset of Python `re` and RE2 (no look-arounds), because
# the API server runs them too, in OpenAPI `pattern`s and CEL `matches()`.
_IDENT = r"[A-Za-z0-9_][A-Za-z0-9_-]*"
REGISTER_TO_PATTERN = rf"^{_IDENT}\.{_IDENT}(\.{_IDENT})?$"
_TRIMMED = r"^\S(.*\S)?$"
_NOT_BLANK = r"\S"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
RESOURCE_NAME_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_QUANTITY = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_STORAGE_URI = r"^([A-Za-z][A-Za-z0-9+.-]*://\S+|/\S*)$"
# Data files by extension: IFT/CHAT read JSONL, so these other formats are a mistake there;
# CONTINUED_PRETRAIN reads a folder of .txt files, so any single data file is a mistake.
_NOT_JSONL_FILE = r"(?i)\.(txt|csv|tsv|parquet|arrow|md)$"
_DATA_FILE = r"(?i)\.(jsonl|json|txt|csv|tsv|parquet|arrow|md)$"
# Weights Composer cannot resume from: Hugging Face files and single shards of a sharded save.
_NOT_COMPOSER_WEIGHTS = r"(?i)\.(bin|safetensors|pth|ckpt|gguf|distcp)$"
_PATH_UP = r"(^|/)\.\.(/|$)"


# --- CEL rules, attached to the JSON schema that crdgen turns into the CRD --------------------


def _cel_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Cel:
    """An `x-kubernetes-validations` rule for the schema node of the annotated field."""

    rule: str
    message: str
    field_path: str | None = None

    def as_dict(self) -> dict[str, str]:
        rule = {"rule": self.rule, "message": self.message}
        return rule | ({"fieldPath": self.field_path} if self.field_path else {})

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        json_schema = handler(core_schema)
        json_schema.setdefault("x-kubernetes-validations", []).append(self.as_dict())
        return json_schema


def _immutable(field: str) -> Cel:
    return Cel("self == oldSelf", f"{field} cannot change once set; create a new TrainingRun instead")


def _matches(pattern: str, message: str) -> Cel:
    return Cel(f"self.matches({_cel_string(pattern)})", message)


def _cel_rules(*rules: Cel) -> dict[str, Any]:
    return {"x-kubernetes-validations": [rule.as_dict() for rule in rules]}


# --- Field types ---------------------------------------------------------------------------


def _pattern_check(pattern: str, expected: str) -> AfterValidator:
    # RE2's `$` is the end of the text; Python's also matches before a final newline.
    regex = re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)

    def check(value: str) -> str:
        if regex.search(value) is None:
            raise ValueError(f"must be {expected}, got {value!r}")
        return value

    return AfterValidator(check)


def _text(max_length: int) -> Any:
    """A string without leading or trailing blanks: a stray space in a path is a typo."""
    return Annotated[
        str,
        _pattern_check(_TRIMMED, "non-empty without leading or trailing spaces"),
        Field(max_length=max_length, json_schema_extra={"pattern": _TRIMMED}),
    ]


def _patterned(pattern: str, expected: str, max_length: int) -> Any:
    return Annotated[
        str,
        _pattern_check(pattern, expected),
        Field(max_length=max_length, json_schema_extra={"pattern": pattern}),
    ]


def _quantity_from_int(value: Any) -> Any:
    # YAML users write `cpu: 4`; the CRD types quantities int-or-string, so integers pass too.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_from_int),
    _pattern_check(_QUANTITY, "a Kubernetes quantity such as 500m, 4, 16Gi"),
    Field(max_length=64, json_schema_extra={"pattern": _QUANTITY, "x-kubernetes-int-or-string": True}),
]
DnsName = _patterned(_DNS_SUBDOMAIN, "a lowercase DNS name (a-z, 0-9, '-', '.')", 253)


_PATH_UP_RULE = "must not contain '..' segments (a path cannot climb out of its folder)"


def _no_path_up(value: str) -> str:
    if re.search(_PATH_UP, value):
        raise ValueError(f"{_PATH_UP_RULE}, got {value!r}")
    return value


_NO_PATH_UP = Cel(f"!self.matches({_cel_string(_PATH_UP)})", _PATH_UP_RULE)


# Paths the pods read: '..' would climb out of the folder the path names (another run's storage).
DataPath = Annotated[
    _text(4096),
    AfterValidator(_no_path_up),
    _NO_PATH_UP,
]


def _finite_or_none(value: Any) -> Any:
    # A diverged run reports a NaN loss; JSON (and so the status) cannot carry it.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


DisplayFloat = Annotated[float | None, BeforeValidator(_finite_or_none)]


class _Api(BaseModel):
    # populate_by_name serves Python callers only (`TrainingRunSpec(train_data_path=...)`);
    # documents are parsed by their camelCase names alone, as the API server does.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        alias_generator=to_camel,
        use_attribute_docstrings=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        """As the API server prunes it: a known field set to null (YAML's `key:`) is left out."""
        if not isinstance(data, dict) or None not in data.values():
            return data
        known = _field_names(cls)
        return {key: value for key, value in data.items() if value is not None or key not in known}


@functools.cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    """A model's fields by the names documents use (every tick parses its run: computed once)."""
    return frozenset(field.alias or name for name, field in model.model_fields.items())


class _Spec(_Api):
    # Strict as the CRD's schema: `"4"` is not an integer, `"true"` not a boolean. Enum fields
    # opt out (strict enums want Python members; their values are what YAML gives).
    model_config = ConfigDict(strict=True)


_ENUM = Field(strict=False)


# --- Spec ---------------------------------------------------------------------------------


class PullPolicy(str, Enum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class ComputeResources(_Spec):
    cpu: Quantity | None = None
    """CPU request and limit, e.g. `4` or `500m`."""
    memory: Quantity | None = None
    """Memory request and limit, e.g. `16Gi`."""


MAX_RECORD_BYTES_LIMIT = 2**30  # a record is held in memory whole, tokenized in one piece


class DataPrep(_Spec):
    """How data preparation runs (replaces the managed service's data_prep_cluster_id)."""

    parallelism: int = Field(1, ge=1, le=256)
    """Pods that prepare the data together, a share of the records each; pod 0 merges the shares."""
    resources: ComputeResources = Field(default_factory=ComputeResources)
    max_record_bytes: int = Field(DEFAULT_MAX_RECORD_BYTES, ge=1024, le=MAX_RECORD_BYTES_LIMIT)
    """Largest JSONL line or .txt file read, in bytes (default 8 MiB); a larger one is refused
    without being loaded, naming file:line."""


class Resources(_Spec):
    """Compute for training: one pod per node, one process per GPU unless told otherwise."""

    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            Cel(
                "!has(self.processesPerNode) || self.gpusPerNode == 0 || self.processesPerNode <= self.gpusPerNode",
                "processesPerNode must not exceed gpusPerNode when GPUs are requested",
                ".processesPerNode",
            )
        )
    )

    nodes: int = Field(1, ge=1, le=1024)
    """Training pods (nodes)."""
    gpus_per_node: int = Field(0, ge=0, le=64)
    """GPUs per pod; 0 trains on CPU (gloo)."""
    gpu_resource_name: Annotated[str, Field(max_length=253, pattern=RESOURCE_NAME_PATTERN)] | None = None
    """Extended resource name the GPUs are requested under; default: the operator's (nvidia.com/gpu)."""
    processes_per_node: int | None = Field(None, ge=1, le=64)
    """Training processes per pod; default: gpusPerNode, or 1 on CPU."""
    cpu: Quantity | None = None
    memory: Quantity | None = None
    shared_memory: Quantity = "8Gi"
    """Size of the in-memory /dev/shm volume (data loader workers and NCCL need it)."""

    @model_validator(mode="after")
    def _processes_fit_gpus(self) -> Resources:
        if self.processes_per_node and self.gpus_per_node and self.processes_per_node > self.gpus_per_node:
            raise _field_error(
                "processesPerNode",
                f"{self.processes_per_node} processes per node exceed gpusPerNode ({self.gpus_per_node})",
            )
        return self

    def processes(self) -> int:
        """Training processes per pod."""
        return self.processes_per_node or max(self.gpus_per_node, 1)

    def world_size(self) -> int:
        return self.nodes * self.processes()


class Image(_Spec):
    trainer: _text(512) | None = None
    """Trainer image; default from the operator's configuration."""
    pull_policy: Annotated[PullPolicy, _ENUM] = PullPolicy.IF_NOT_PRESENT


class PvcRef(_Spec):
    claim_name: DnsName
    sub_path: Annotated[
        _text(1024),
        Cel(f"!self.startsWith('/') && !self.matches({_cel_string(_PATH_UP)})", "subPath must be a relative path without '..'"),
    ] | None = None
    """Folder inside the volume under which this run's folders go."""

    @model_validator(mode="after")
    def _relative_sub_path(self) -> PvcRef:
        if self.sub_path and (self.sub_path.startswith("/") or re.search(_PATH_UP, self.sub_path)):
            raise _field_error("subPath", f"must be a relative path without '..', got {self.sub_path!r}")
        return self


class Storage(_Spec):
    """Where prepared data, checkpoints and the converted model go: a PVC or an object store."""

    model_config = ConfigDict(
        json_schema_extra=_cel_rules(Cel("!(has(self.pvc) && has(self.uri))", "set either storage.pvc or storage.uri, not both"))
    )

    pvc: PvcRef | None = None
    uri: _patterned(_STORAGE_URI, "an object-store URI (s3://bucket/prefix) or an absolute path", 2048) | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Storage:
        if self.pvc is not None and self.uri is not None:
            raise ValueError("set either pvc or uri, not both")
        return self


class MlflowSpec(_Spec):
    tracking_uri: _text(2048) | None = None
    """MLflow tracking server; default from the operator's configuration."""


class SecretRef(_Spec):
    name: DnsName


class SecretKeyRef(_Spec):
    name: DnsName
    key: _patterned(_SECRET_KEY, "a Secret key (letters, digits, '-', '_', '.')", 253)


class Secrets(_Spec):
    """References to Secrets; their values are never copied into status, events or logs."""

    hf_token: SecretKeyRef | None = None
    """Hugging Face token, for gated models and datasets."""
    mlflow: SecretRef | None = None
    """Environment variables for MLflow (MLFLOW_TRACKING_TOKEN, ...)."""
    object_store: SecretRef | None = None
    """Environment variables for the object store (AWS_ACCESS_KEY_ID, ...)."""


class Toleration(_Spec):
    key: Annotated[str, Field(max_length=316)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, Field(max_length=63)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Scheduling(_Spec):
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict, max_length=64)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    priority_class_name: DnsName | None = None
    queue_name: _patterned(_DNS_SUBDOMAIN, "a Kueue LocalQueue name", 63) | None = None
    """Kueue LocalQueue; the run is admitted (unsuspended) by Kueue."""


ModelName = Annotated[
    _text(1024),
    AfterValidator(_no_path_up),
    _NO_PATH_UP,
]
RegisterTo = Annotated[
    str,
    _pattern_check(REGISTER_TO_PATTERN, "<catalog>.<schema> or <catalog>.<schema>.<name>"),
    Field(max_length=512),
    _matches(REGISTER_TO_PATTERN, "registerTo must be <catalog>.<schema> or <catalog>.<schema>.<name>"),
]
TrainingDuration = Annotated[
    str,
    _pattern_check(DURATION_PATTERN, "<N>ep, <N>tok or <N>ba with N >= 1 (e.g. 1ep, 1000000tok)"),
    Field(max_length=32),
    _matches(DURATION_PATTERN, "trainingDuration must be <N>ep, <N>tok or <N>ba with N >= 1 (e.g. 1ep, 1000000tok)"),
]
EvalPrompt = Annotated[
    str,
    _pattern_check(_NOT_BLANK, "a non-blank prompt"),
    Field(max_length=16384, json_schema_extra={"pattern": _NOT_BLANK}),
]
def _check_weights_path(value: str) -> str:
    if re.search(_NOT_COMPOSER_WEIGHTS, value):
        raise ValueError(
            "must be a Composer checkpoint: a .pt file, a latest-*.symlink or a folder of .distcp shards"
            f" (to start from Hugging Face weights, name them in `model`), got {value!r}"
        )
    return value


WeightsPath = Annotated[
    DataPath,
    AfterValidator(_check_weights_path),
    Cel(
        f"!self.matches({_cel_string(_NOT_COMPOSER_WEIGHTS)})",
        "customWeightsPath must be a Composer checkpoint: a .pt file, a latest-*.symlink or a folder of .distcp shards",
    ),
]

_JSONL_TASKS = "INSTRUCTION_FINETUNE and CHAT_COMPLETION read JSONL: give a .jsonl file, a folder, a URI, a Delta table or a Hugging Face dataset org/name/split"
_CPT_TASK = "CONTINUED_PRETRAIN reads a folder of .txt files: give a folder, a URI prefix, a Delta table or a Hugging Face dataset org/name/split, not a single file"


def _data_path_rules(field: str, optional: bool) -> list[Cel]:
    guard = f"!has(self.{field}) || " if optional else ""
    return [
        Cel(
            f"{guard}self.taskType == 'CONTINUED_PRETRAIN' || !self.{field}.matches({_cel_string(_NOT_JSONL_FILE)})",
            f"{field}: {_JSONL_TASKS}",
            f".{field}",
        ),
        Cel(
            f"{guard}self.taskType != 'CONTINUED_PRETRAIN' || !self.{field}.matches({_cel_string(_DATA_FILE)})",
            f"{field}: {_CPT_TASK}",
            f".{field}",
        ),
    ]


_WORLD_SIZE_CEL = (
    "self.resources.nodes * (has(self.resources.processesPerNode) ? self.resources.processesPerNode"
    " : (self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1))"
)


class TrainingRunSpec(_Spec):
    """What to fine-tune, on which data, where to register it, and the compute to do it with."""

    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            *_data_path_rules("trainDataPath", optional=False),
            *_data_path_rules("evalDataPath", optional=True),
            Cel(
                f"self.globalBatchSize % ({_WORLD_SIZE_CEL}) == 0",
                "globalBatchSize must be a multiple of the number of training processes (nodes x processes per node)",
                ".globalBatchSize",
            ),
        )
    )

    model: Annotated[ModelName, _immutable("model")]
    """Hugging Face model id (meta-llama/Llama-3.1-8B-Instruct) or a path/URI to a model folder."""
    train_data_path: Annotated[DataPath, _immutable("trainDataPath")]
    """A .jsonl file, a folder, an object-store URI, a Delta table or a Hugging Face dataset org/name/split."""
    register_to: Annotated[RegisterTo, _immutable("registerTo")]
    """<catalog>.<schema>[.<name>]: the registered model name; without <name> the run's name is used."""
    task_type: Annotated[TaskType, _ENUM, _immutable("taskType")] = TaskType.INSTRUCTION_FINETUNE
    eval_data_path: DataPath | None = None
    """Evaluated at every checkpoint; same formats as trainDataPath."""
    eval_prompts: list[EvalPrompt] = Field(default_factory=list, max_length=64)
    """Prompts generated from at every checkpoint; the generations are logged to MLflow."""
    custom_weights_path: WeightsPath | None = None
    """A Composer checkpoint to start from instead of the model's pretrained weights."""
    training_duration: TrainingDuration = "1ep"
    """<N>ep, <N>tok or <N>ba."""
    learning_rate: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    """Peak learning rate; default 5e-7 (1e-5 for 405B-parameter models)."""
    context_length: int | None = Field(None, ge=1, le=MAX_CONTEXT_LENGTH)
    """Max tokens per sample; default min(8192, the model's max context)."""
    global_batch_size: int = Field(16, ge=1, le=65536)
    """Sequences per optimizer step, across all processes."""
    validate_inputs: bool = True
    """Check every input before any GPU is requested."""
    experiment_path: _text(1024) | None = None
    """MLflow experiment; default /Users/<owner>/<run name>."""
    data_prep: DataPrep = Field(default_factory=DataPrep)
    resources: Resources = Field(default_factory=Resources)
    image: Image = Field(default_factory=Image)
    storage: Storage = Field(default_factory=Storage)
    """Default from the operator's configuration when neither pvc nor uri is set."""
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    secrets: Secrets = Field(default_factory=Secrets)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    suspend: bool = False
    """Stop the pods; training resumes from the latest checkpoint when lifted."""
    backoff_limit: int = Field(3, ge=0, le=100)
    """Restarts of all ranks (from the latest checkpoint) before the run fails."""
    active_deadline_seconds: int | None = Field(None, gt=0)
    ttl_seconds_after_finished: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _data_paths_fit_task(self) -> TrainingRunSpec:
        for field, path in (("trainDataPath", self.train_data_path), ("evalDataPath", self.eval_data_path)):
            if path is not None and (problem := data_path_problem(path, self.task_type)):
                raise _field_error(field, problem)
        return self

    @model_validator(mode="after")
    def _context_fits_model(self) -> TrainingRunSpec:
        info = models_catalog.lookup(self.model)
        if self.context_length and info and self.context_length > info.max_context_length:
            raise _field_error(
                "contextLength",
                f"{self.context_length} exceeds the maximum context length of {info.name} ({info.max_context_length})",
            )
        return self

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainingRunSpec:
        world = self.resources.world_size()
        if self.global_batch_size % world:
            raise _field_error(
                "globalBatchSize",
                f"{self.global_batch_size} is not a multiple of the {world} training processes"
                " (resources.nodes x processes per node)",
            )
        return self

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LEARNING_RATE_405B if models_catalog.is_405b(self.model) else DEFAULT_LEARNING_RATE

    def resolved_register_name(self, run_name: str) -> str:
        """The full `catalog.schema.name`; the run's name fills in a missing `<name>`."""
        if self.register_to.count(".") == 2:
            return self.register_to
        # Kubernetes names may hold dots, which would add a fourth name segment.
        return f"{self.register_to}.{re.sub(r'[^A-Za-z0-9_-]', '_', run_name)}"

    def resolved_experiment_path(self, owner: str, run_name: str) -> str:
        return self.experiment_path or f"/Users/{owner}/{run_name}"

    def resolved_context_length(self) -> int | None:
        """The explicit value, else min(8192, the model's max); None when the model is unknown
        (the trainer then reads the max from the model's config)."""
        if self.context_length is not None:
            return self.context_length
        info = models_catalog.lookup(self.model)
        return min(DEFAULT_MAX_CONTEXT, info.max_context_length) if info else None


def data_path_problem(path: str, task_type: TaskType) -> str | None:
    """Why `path` cannot hold `task_type` data, judged by its shape alone (no I/O)."""
    if task_type is TaskType.CONTINUED_PRETRAIN:
        return f"{_CPT_TASK}, got {path!r}" if re.search(_DATA_FILE, path) else None
    return f"{_JSONL_TASKS}, got {path!r}" if re.search(_NOT_JSONL_FILE, path) else None


# --- Status -------------------------------------------------------------------------------


class Phase(str, Enum):
    PENDING = "Pending"
    QUEUED = "Queued"
    PREPARING_DATA = "PreparingData"
    TRAINING = "Training"
    REGISTERING = "Registering"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    SUSPENDED = "Suspended"


TERMINAL: frozenset[Phase] = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})


class EventType(str, Enum):
    CREATED = "CREATED"
    VALIDATED = "VALIDATED"
    DATA_VALIDATED = "DATA_VALIDATED"
    TRAIN_STARTED = "TRAIN_STARTED"
    TRAIN_UPDATED = "TRAIN_UPDATED"
    CHECKPOINT_SAVED = "CHECKPOINT_SAVED"
    TRAIN_FINISHED = "TRAIN_FINISHED"
    RETRYING = "RETRYING"
    RESUMED_FROM_CHECKPOINT = "RESUMED_FROM_CHECKPOINT"
    CHECKPOINT_FALLBACK = "CHECKPOINT_FALLBACK"  # the newest checkpoint was unreadable
    REGISTERED = "REGISTERED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


class _Status(_Api):
    # The operator writes the status; unknown keys come from other writers (kopf's own state)
    # or a newer operator, and must not make the resource unreadable.
    model_config = ConfigDict(extra="ignore")


class Condition(_Status):
    type: Annotated[str, Field(min_length=1, max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(max_length=1024)] = ""
    message: Annotated[str, Field(max_length=32768)] = ""
    observed_generation: int | None = Field(None, ge=0)
    last_transition_time: datetime | None = None


class Progress(_Status):
    percent: float = Field(0.0, ge=0, le=100)
    current_duration: str | None = None
    total_duration: str | None = None
    tokens_per_second: DisplayFloat = None
    loss: DisplayFloat = None
    eta_seconds: DisplayFloat = None
    mfu: DisplayFloat = None
    """Model FLOPs utilisation (0..1) of the GPUs; absent where their peak is unknown (CPUs)."""


class DataStats(_Status):
    samples: int = Field(0, ge=0)
    tokens: int = Field(0, ge=0)
    truncated_samples: int = Field(0, ge=0)
    dropped_samples: int = Field(0, ge=0)
    """Valid records left with no token to learn once truncated to the context length."""
    sequences: int = Field(0, ge=0)
    packing_efficiency: float = Field(0.0, ge=0, le=1)


class RegisteredModel(_Status):
    # MLflow reports versions as strings or numbers depending on the client; keep strings.
    model_config = ConfigDict(coerce_numbers_to_str=True)

    name: str
    version: str
    artifact_uri: str | None = None
    """URI of the registered Hugging Face folder."""


class MlflowInfo(_Status):
    experiment_id: str | None = None
    run_id: str | None = None


class Resume(_Status):
    """Where the latest training attempt that did not start afresh started from."""

    attempt: int = Field(1, ge=1)
    checkpoint: str | None = None
    """The checkpoint it resumed from; absent when it fell back to the initial weights."""
    note: Annotated[str, Field(max_length=4096)] | None = None
    """Set when a newer checkpoint was passed over (unreadable or half-written): which, and why."""


class RunEvent(_Status):
    type: EventType
    time: datetime
    message: Annotated[str, Field(max_length=4096)] = ""


class TrainingRunStatus(_Status):
    phase: Phase = Phase.PENDING
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    progress: Progress | None = None
    latest_checkpoint: str | None = None
    mlflow: MlflowInfo | None = None
    registered_model: RegisteredModel | None = None
    data_stats: DataStats | None = None
    attempts: int = Field(0, ge=0)
    resume: Resume | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None
    events: list[RunEvent] = Field(default_factory=list, max_length=MAX_EVENTS)
    """The latest events, oldest first."""
    observed_generation: int | None = Field(None, ge=0)


# --- The resource -------------------------------------------------------------------------


class ObjectMeta(_Api):
    # Only what kubetune reads; the rest (managedFields, resourceVersion, ...) is not ours.
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(min_length=1)]  # TrainingRun._name_fits_children has the real limit
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None


class TrainingRun(_Api):
    api_version: Literal["kubetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["TrainingRun"] = KIND
    metadata: ObjectMeta
    spec: TrainingRunSpec
    status: TrainingRunStatus | None = None

    @model_validator(mode="after")
    def _name_fits_children(self) -> TrainingRun:
        name = self.metadata.name
        if len(name) > MAX_RUN_NAME_LENGTH or not re.match(RUN_NAME_PATTERN, name):
            shown = repr(name) if len(name) <= 60 else f"{name[:57]!r}... ({len(name)} characters)"
            raise _field_error("metadata.name", f"{RUN_NAME_RULE.removeprefix('metadata.name ')}, got {shown}")
        return self

    @property
    def owner(self) -> str:
        return self.owner_by(OWNER_ANNOTATION)

    def owner_by(self, annotation: str) -> str:
        """Whose run this is (MLflow experiment folder): the owner annotation (its key is an
        operator setting), else the namespace."""
        return self.metadata.annotations.get(annotation) or self.metadata.namespace

    def register_name(self) -> str:
        return self.spec.resolved_register_name(self.metadata.name)

    def experiment_path(self) -> str:
        return self.spec.resolved_experiment_path(self.owner, self.metadata.name)


# --- Parsing with field-naming errors -----------------------------------------------------

_FIELD_ERROR = "kubetune_field"


def _field_error(field: str, message: str) -> PydanticCustomError:
    """An error about `field` (camelCase, relative to the model raising it) from a model rule."""
    return PydanticCustomError(_FIELD_ERROR, "{field}: {message}", {"field": field, "message": message})


@dataclass(frozen=True)
class Problem:
    field: str  # e.g. spec.resources.nodes
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SpecError(ValueError):
    """An invalid TrainingRun: permanent, reported with reason `InvalidSpec`, one line per problem."""

    reason = "InvalidSpec"

    def __init__(self, field: str, message: str, *more: Problem) -> None:
        self.problems: tuple[Problem, ...] = (Problem(field, message), *more)
        super().__init__(str(self))

    @property
    def field(self) -> str:
        return self.problems[0].field

    @property
    def message(self) -> str:
        return self.problems[0].message

    def __str__(self) -> str:
        return "\n".join(map(str, self.problems))

    @classmethod
    def from_validation_error(cls, error: ValidationError, prefix: tuple[str, ...] = ()) -> SpecError:
        first, *rest = [_problem(detail, prefix) for detail in error.errors(include_url=False)]
        return cls(first.field, first.message, *rest)


def _problem(detail: Any, prefix: tuple[str, ...]) -> Problem:
    loc = [*prefix, *detail["loc"]]
    ctx = detail.get("ctx") or {}
    if detail["type"] == _FIELD_ERROR:
        return Problem(_field_path([*loc, *ctx["field"].split(".")]), ctx["message"])
    return Problem(_field_path(loc) or "(root)", _describe(detail, loc))


def _field_path(loc: Sequence[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
            path += f".{part}" if path else str(part)
        else:  # map keys such as node selector labels
            path += f"[{str(part)!r}]"
    return path


def _describe(detail: Any, loc: Sequence[Any]) -> str:
    kind, message, value = detail["type"], detail["msg"], detail.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return _unknown_field(loc)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if value is None:
            return "required field is missing (or written with nothing after the colon)"
        return f"must be a mapping of fields (key: value), got {_type_name(value)}"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if isinstance(value, (str, int, float, bool)):
        shown = repr(value)
        message += f", got {shown if len(shown) <= 80 else shown[:77] + '...'}"
    return message


def _unknown_field(loc: Sequence[Any]) -> str:
    """`unknown field`, with the field meant when the name is a misspelling or snake_case."""
    known = _fields_at(loc[:-1])
    name = str(loc[-1])
    guess = to_camel(name) if to_camel(name) in known else next(iter(difflib.get_close_matches(name, known, n=1)), None)
    hint = f"; did you mean {guess}?" if guess else ""
    return f"unknown field{hint} (fields are camelCase; see `kubectl explain trainingrun.spec`)"


def _fields_at(loc: Sequence[Any]) -> list[str]:
    """The field names of the model at `loc` (a path of aliases from a TrainingRun)."""
    model: Any = TrainingRun
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        model = _model_in(field.annotation) if field else None
        if model is None:
            return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def _type_name(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


_SCALARS = frozenset((str, int, float, bool, type(None)))


def plain(value: Any) -> Any:
    """A deep, mutable copy of JSON-like data as dicts and lists (kopf hands out read-only views)."""
    if type(value) in _SCALARS:  # most leaves: skip the slow abstract-class checks
        return value
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def parse_training_run(body: Mapping[str, Any]) -> TrainingRun:
    """A TrainingRun from its Kubernetes body; SpecError naming every bad field otherwise."""
    try:
        return TrainingRun.model_validate(plain(body), by_alias=True, by_name=False)
    except ValidationError as error:
        raise SpecError.from_validation_error(error) from None


def parse_spec(spec: Mapping[str, Any]) -> TrainingRunSpec:
    """Just the spec (the SDK builds one before the resource exists); errors say `spec.<field>`."""
    try:
        return TrainingRunSpec.model_validate(plain(spec), by_alias=True, by_name=False)
    except ValidationError as error:
        raise SpecError.from_validation_error(error, prefix=("spec",)) from None
