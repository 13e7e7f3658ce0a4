"""The SDK's functions, with the signatures of databricks-genai 1.1.8's `foundation_model`.

Every parameter of that SDK is here, in its place, with its default (tests/unit/test_sdk_signatures.py
compares them with the real wheel). Where kubetune differs, the docstring says so:

- `create(task_type=...)` defaults to INSTRUCTION_FINETUNE, as the service's documentation says
  (1.1.8's code said CHAT_COMPLETION);
- `data_prep_cluster_id` is accepted and ignored with a warning: data preparation runs in a Job;
- keyword-only parameters after the service's own say where a run lives (`namespace=`, and for
  `list` also `all_namespaces=`, `selector=`) and, for `create`, Kubernetes fields the service had
  no word for (`name=`, `labels=`, `spec=` with any further TrainingRun spec fields).

Runs are found in the current kubeconfig context's namespace unless `namespace=` names another;
a `TrainingRun` object carries its own.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .. import models_catalog
from .checkpoints import checkpoints_of
from .errors import InvalidArgumentsError
from .follow import display_for_environment, follow
from .query import Filters, select
from .spec import build_resource, run_name
from .types import (
    CANCEL_ANNOTATION,
    MODEL_COLUMNS,
    RUN_COLUMNS,
    ObjectList,
    RunStatus,
    TrainingRun,
    events_of,
    model_constants,
    run_from_resource,
)

if TYPE_CHECKING:
    from .client import Runs

DEFAULT_LIMIT = 100
RunRef = str | TrainingRun


def create(
    model: str,
    train_data_path: str,
    register_to: str,
    *,
    experiment_path: str | None = "",
    task_type: str | None = "INSTRUCTION_FINETUNE",
    eval_data_path: str | None = None,
    eval_prompts: builtins.list[str] | None = None,
    custom_weights_path: str | None = None,
    training_duration: str | None = None,
    learning_rate: float | None = None,
    context_length: int | None = None,
    validate_inputs: bool | None = True,
    data_prep_cluster_id: str | None = None,
    name: str | None = None,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
    spec: Mapping[str, Any] | None = None,
) -> TrainingRun:
    """Create a fine-tuning run (a TrainingRun resource) and return it.

    Args:
        model: a Hugging Face model id (see `get_models()`) or a path/URI to a model folder.
        train_data_path: a .jsonl file, a folder, an object-store URI, a Delta table or a Hugging
            Face dataset `org/name/split`; CONTINUED_PRETRAIN reads a folder of .txt files.
        register_to: `<catalog>.<schema>[.<name>]`, the registered model's name (without `<name>`,
            the run's name).
        experiment_path: MLflow experiment; default `/Users/<you>/<run name>`.
        task_type: INSTRUCTION_FINETUNE (default), CHAT_COMPLETION or CONTINUED_PRETRAIN.
        eval_data_path, eval_prompts: evaluated and generated from at every checkpoint.
        custom_weights_path: a Composer checkpoint to start from, e.g. one of `get_checkpoints(run)`.
        training_duration: `<N>ep`, `<N>tok` or `<N>ba`; default 1ep.
        learning_rate: peak learning rate; default 5e-7 (1e-5 for 405B models).
        context_length: max tokens per sample; default min(8192, the model's maximum).
        validate_inputs: check every input before any GPU is asked for (default True).
        data_prep_cluster_id: accepted for the service's code and ignored, with a warning: kubetune
            prepares data in a Job (`spec={'dataPrep': {...}}` sets its workers and resources).
        name: the run's name; default `<model>-<6 hex characters>`, as the service named runs.
        namespace: where the run goes; default the kubeconfig context's namespace.
        labels: labels for the resource (`kubetune list --selector` finds runs by them).
        spec: further TrainingRun spec fields, as in YAML, e.g. `{'resources': {'nodes': 2,
            'gpusPerNode': 8}, 'storage': {'uri': 's3://bucket/runs'}}`.

    Raises:
        InvalidArgumentsError: the arguments make no valid TrainingRun (nothing is created), or
            the name is taken. Also NoClusterError, CrdNotInstalledError, PermissionDeniedError.
    """
    arguments = {"model": model, "train_data_path": train_data_path, "register_to": register_to,
                 "experiment_path": experiment_path, "task_type": task_type, "eval_data_path": eval_data_path,
                 "eval_prompts": eval_prompts, "custom_weights_path": custom_weights_path,
                 "training_duration": training_duration, "learning_rate": learning_rate,
                 "context_length": context_length, "validate_inputs": validate_inputs,
                 "data_prep_cluster_id": data_prep_cluster_id}
    if not isinstance(model, str) or not model.strip():
        raise InvalidArgumentsError("model must name a model: a Hugging Face id or a model folder")
    with _connect(namespace) as runs:
        resource = build_resource(arguments, name=name or run_name(model), namespace=runs.namespace,
                                  owner=runs.whoami(), labels=labels, extra_spec=spec)
        return run_from_resource(runs.create(resource))


def get(training_run: RunRef, *, namespace: str | None = None) -> TrainingRun:
    """The run of that name (or that run object, fetched again); RunNotFoundError if none."""
    name, namespace = _reference(training_run, namespace)
    with _connect(namespace) as runs:
        return run_from_resource(runs.get(name))


def list(  # noqa: A001 - the service's name
    training_runs: builtins.list[str] | builtins.list[TrainingRun] | ObjectList | None = None,
    experiment_id: str | None = None,
    *,
    statuses: builtins.list[str] | builtins.list[RunStatus] | None = None,
    user_emails: builtins.list[str] | None = None,
    before: str | datetime | None = None,
    after: str | datetime | None = None,
    include_details: bool = True,
    limit: int | None = DEFAULT_LIMIT,
    namespace: str | None = None,
    all_namespaces: bool = False,
    selector: str | None = None,
) -> ObjectList:
    """Runs, newest first: by name, MLflow experiment, status, creator (`user_emails` match the
    run's owner: its `kubetune.dev/owner` annotation, which `create` sets to your user name),
    creation time (`before` exclusive, `after` inclusive), at most `limit` (None: all).

    kubetune adds `namespace=` (default: the kubeconfig's), `all_namespaces=True` and `selector=`
    (a label selector, as `kubectl -l` takes)."""
    filters = Filters.from_arguments(training_runs=training_runs, experiment_id=experiment_id,
                                     statuses=statuses, user_emails=user_emails, before=before,
                                     after=after, limit=limit)
    with _connect(namespace) as runs:
        items = runs.list(all_namespaces=all_namespaces, selector=selector).get("items") or []
    chosen = select([run_from_resource(item) for item in items], filters)
    if not include_details:
        for run in chosen:
            run.events = None
    return ObjectList(chosen, RUN_COLUMNS)


def cancel(
    runs: RunRef | builtins.list[str] | builtins.list[TrainingRun] | None = None,
    experiment_id: str | None = None,
    *,
    namespace: str | None = None,
) -> int:
    """Cancel runs (by name or object), or every run of an MLflow experiment, without deleting
    them; their pods stop and the runs end STOPPED. Returns how many were cancelled (runs that
    had ended already are not). RunNotFoundError names a run that does not exist."""
    if bool(runs) == bool(experiment_id):
        raise InvalidArgumentsError("give cancel() either the run(s) or an MLflow experiment_id, not "
                                    + ("both" if runs else "neither"))
    with _connect(_namespace_of(runs, namespace)) as api:
        targets = resolve_targets(api, runs, namespace) if runs else [
            run for run in (run_from_resource(i) for i in api.list().get("items") or [])
            if run.experiment_id == experiment_id]
        active = cancel_active(api, targets)
    _say_cancelled(active, len(targets))
    return len(active)


def delete(runs: RunRef | builtins.list[str] | builtins.list[TrainingRun], *,
           namespace: str | None = None) -> int:
    """Delete runs (by name or object), with the Jobs and pods they made; a running one stops.
    Returns how many were deleted; RunNotFoundError names a run that does not exist. (The
    service's SDK 1.0.0 had this function; 1.1.8 dropped it.)"""
    if not runs:
        raise InvalidArgumentsError("give delete() the run(s) to delete")
    with _connect(_namespace_of(runs, namespace)) as api:
        targets = resolve_targets(api, runs, namespace)
        for run in targets:
            api.delete(run.name, run.namespace)
    return len(targets)


def get_events(training_run: RunRef, follow: bool = False, *, namespace: str | None = None) -> ObjectList:
    """The run's events (type, time, message), oldest first.

    With `follow=True`, shows each new event as it happens, and the progress (percent, tokens/s,
    loss, ETA) while it trains, in the notebook's output cell or on the terminal, and returns when
    the run ends (COMPLETED, FAILED or STOPPED). It listens to a watch on the resource: no polling."""
    name, namespace = _reference(training_run, namespace)
    with _connect(namespace) as runs:
        if not follow:
            return events_of(runs.get(name))
        runs.get(name)  # RunNotFoundError before anything is shown
        ended = follow_run(runs, name, display_for_environment())
    return ended.events


def follow_run(runs: Runs, name: str, display) -> TrainingRun:
    """Show the run's changes on `display` until it ends; the run as it ended."""
    changes = runs.watch(name=name)
    try:
        return follow(changes, display)
    finally:
        changes.close()


def get_checkpoints(training_run: RunRef, *, namespace: str | None = None) -> builtins.list[str]:
    """The run's Composer checkpoints, oldest first, as paths that `create(custom_weights_path=...)`
    takes as they are (on the run's storage: its volume's path as pods see it, or an object-store URI).

    kubetune reads them from the run's status (each CHECKPOINT_SAVED event and `latestCheckpoint`),
    not from MLflow artifacts; the run is fetched afresh, so an old run object sees new checkpoints."""
    run = get(training_run, namespace=namespace)
    paths = checkpoints_of(run.resource)
    if not paths:
        print("No checkpoints created yet for this run. Please try again later.")
    return paths


def get_models() -> ObjectList:
    """The models kubetune knows by name, with their maximum context length (other Hugging Face
    ids and model folders work too; their context length is read from the model's config)."""
    return ObjectList([model_constants(info) for info in models_catalog.supported_models()], MODEL_COLUMNS)


# --- helpers ---------------------------------------------------------------------------------

def _connect(namespace: str | None) -> Runs:
    from .client import connect  # the kubernetes client loads on first use, not on import

    return connect(namespace)


def _reference(run: RunRef, namespace: str | None) -> tuple[str, str | None]:
    if isinstance(run, TrainingRun):
        return run.name, namespace or run.namespace
    if isinstance(run, str) and run.strip():
        return run.strip(), namespace
    raise InvalidArgumentsError(f"a run is a name or a TrainingRun, got {run!r}")


def _many(runs: Any) -> builtins.list[RunRef]:
    return [runs] if isinstance(runs, (str, TrainingRun)) else builtins.list(runs)


def _namespace_of(runs: Any, namespace: str | None) -> str | None:
    """`namespace=`, else the namespace of the first run object given, else the kubeconfig's."""
    if namespace or not runs:
        return namespace
    first = _many(runs)[0]
    return first.namespace if isinstance(first, TrainingRun) else None


def resolve_targets(api: Runs, runs: Any, namespace: str | None) -> builtins.list[TrainingRun]:
    """Each named run as it is now; RunNotFoundError (before any change) if one is missing."""
    found = []
    for ref in _many(runs):
        name, where = _reference(ref, namespace)
        found.append(run_from_resource(api.get(name, where)))
    return found


def cancel_active(api: Runs, targets: builtins.list[TrainingRun]) -> builtins.list[TrainingRun]:
    """Ask the operator to stop each run that has not ended (the cancel annotation); those runs."""
    active = [run for run in targets if not run.status.is_terminal()]
    for run in active:
        api.annotate(run.name, run.namespace, {CANCEL_ANNOTATION: "true"})
    return active


def _say_cancelled(done: builtins.list[TrainingRun], asked: int) -> None:
    """What the service's cancel() printed."""
    if not done:
        print("No active runs found to cancel.")
        return
    skipped = f" {asked - len(done)} run(s) had ended already." if asked > len(done) else ""
    print(f"Cancelled {', '.join(run.name for run in done)} successfully.{skipped}")


__all__ = ["cancel", "create", "delete", "get", "get_checkpoints", "get_events", "get_models", "list"]
