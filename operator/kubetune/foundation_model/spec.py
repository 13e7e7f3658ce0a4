"""`create(...)`'s arguments → a TrainingRun resource, checked by the API models (no I/O).

The field rules live in `kubetune.api` only: this module names fields and lets
`parse_training_run` judge them, turning its `SpecError` into `InvalidArgumentsError` with the
argument's own name beside the field's.
"""

from __future__ import annotations

import re
import secrets
import warnings
from collections.abc import Mapping
from typing import Any

from ..api import API_VERSION, KIND, MAX_RUN_NAME_LENGTH, OWNER_ANNOTATION, SpecError, parse_training_run
from ..api import plain as plain_copy
from .errors import InvalidArgumentsError

# create() argument → spec field (camelCase, as the resource spells it)
ARGUMENT_FIELDS = {
    "model": "model",
    "train_data_path": "trainDataPath",
    "register_to": "registerTo",
    "experiment_path": "experimentPath",
    "task_type": "taskType",
    "eval_data_path": "evalDataPath",
    "eval_prompts": "evalPrompts",
    "custom_weights_path": "customWeightsPath",
    "training_duration": "trainingDuration",
    "learning_rate": "learningRate",
    "context_length": "contextLength",
    "validate_inputs": "validateInputs",
}
DATA_PREP_CLUSTER_MESSAGE = (
    "data_prep_cluster_id is ignored: kubetune prepares data in a Job of its own, no Spark cluster;"
    " set its workers and resources with spec={'dataPrep': {'parallelism': 4, 'resources': {...}}}")
_SUFFIX = 6  # hex characters after the model's name


def run_name(model: str) -> str:
    """`<model>-<random>` as the service named runs, fitted to the TrainingRun name rules."""
    stem = re.sub(r"[^a-z0-9]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")
    stem = re.sub(r"^[^a-z]+", "", stem)[: MAX_RUN_NAME_LENGTH - _SUFFIX - 1].rstrip("-") or "run"
    return f"{stem}-{secrets.token_hex(_SUFFIX // 2)}"


def spec_from_arguments(arguments: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The spec: the given (non-None, non-empty) arguments, then `extra` spec fields on top."""
    spec = {ARGUMENT_FIELDS[key]: value for key, value in arguments.items()
            if value is not None and value != "" and key in ARGUMENT_FIELDS}
    for key, value in plain_copy(dict(extra or {})).items():
        if key in spec or ARGUMENT_FIELDS.get(key) in spec:  # camelCase or snake_case, as the API takes
            raise InvalidArgumentsError(
                f"spec[{key!r}] repeats an argument of create(); give it once, as the argument")
        spec[key] = value
    return spec


def build_resource(arguments: Mapping[str, Any], *, name: str, namespace: str, owner: str | None,
                   labels: Mapping[str, str] | None, extra_spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """A checked TrainingRun resource for `create`'s arguments; InvalidArgumentsError otherwise."""
    if arguments.get("data_prep_cluster_id") is not None:
        warnings.warn(DATA_PREP_CLUSTER_MESSAGE, UserWarning, stacklevel=3)
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if owner:
        metadata["annotations"] = {OWNER_ANNOTATION: owner}
    if labels:
        metadata["labels"] = dict(labels)
    resource = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata,
                "spec": spec_from_arguments(arguments, extra_spec)}
    try:
        run = parse_training_run(resource)
    except SpecError as error:
        raise InvalidArgumentsError(explain(error)) from None
    # What was given, as the API parsed it (`cpu: 4` becomes the quantity "4", enums their values).
    resource["spec"] = run.spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return resource


def explain(error: SpecError) -> str:
    """The API's problems, each naming the create() argument where there is one."""
    by_field = {f"spec.{field}": argument for argument, field in ARGUMENT_FIELDS.items()}
    lines = []
    for problem in error.problems:
        root = re.match(r"spec\.[A-Za-z]+", problem.field)
        argument = by_field.get(root.group(0)) if root else None
        where = f"{argument} ({problem.field})" if argument else problem.field
        lines.append(f"{where}: {problem.message}")
    return "invalid TrainingRun:\n  " + "\n  ".join(lines)
