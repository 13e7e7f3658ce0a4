"""`register`: the converted Hugging Face folder -> one version in MLflow's model registry per run.

The version is an MLflow `transformers` model saved from the folder as a local checkpoint (the
files are copied, the model is never loaded, so it stays fast for any size): `mlflow.transformers`
and `mlflow models serve` load it (OpenAI-style chat or completions signature), and its `model/`
subfolder is the plain Hugging Face folder, which `transformers` loads as is once downloaded;
`registeredModel.artifactUri` points there.

`create_model_version` adds a version on every call, so the version tagged with this run's uid is
looked up first: a retried finalize returns it instead of registering a second one. A create
whose reply was lost can still land twice (the HTTP client retries it), so after creating, any
younger version of the same run is deleted: one run, one version.

A tracking server that is down or answers 5xx is waited for, with exponential backoff, for
`KUBETUNE_REGISTER_RETRY_SECONDS` (a restart or a short outage passes unnoticed); after that
the step fails as `MLflowUnavailable` (retryable: the finalize Job tries again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import RunConfig
from .contract import HF_MARKER, TRAIN_RESULT_FILE
from .errors import TransientError, UserError
from .results import write_json_atomically
from .tracking import RUN_NAME_TAG, RUN_UID_TAG, tracking_uri

log = logging.getLogger(__name__)

TRAINING_RUN_TAG = "kubetune.training_run_id"
MODEL_ARTIFACT = "model"  # the MLflow model in the run's artifacts
HF_SUBFOLDER = "model"  # where mlflow.transformers keeps the checkpoint's files inside it
# catalog.schema.name, each part an identifier (Unity Catalog's rule, kept for OSS MLflow too).
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*){2}")
# The client retries each request a little (urllib3, exponential backoff); longer outages are
# waited out by `with_retries`, which also tells them in the log.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
RETRY_SECONDS_VARIABLE = "KUBETUNE_REGISTER_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
FIRST_RETRY_DELAY, MAX_RETRY_DELAY = 2.0, 30.0
UNAVAILABLE = "MLflowUnavailable"
# MLflow error codes that say the request itself is wrong: retrying cannot help.
PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED",
                   "UNAUTHENTICATED", "INVALID_STATE"}


def run_register(config: RunConfig) -> dict:
    name = model_name(config.register_to)
    hf_dir = converted_folder(config)
    for variable, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(variable, value)
    started = time.monotonic()
    result = with_retries(lambda: register_once(config, name, hf_dir), retry_seconds())
    write_json_atomically(Path(config.result_dir) / "register.json", result, indent=2)
    log.info("registered %s version %s in %.1fs", name, result["registeredModel"]["version"],
             time.monotonic() - started)
    return result


def register_once(config: RunConfig, name: str, hf_dir: Path) -> dict:
    with mlflow_errors(tracking_uri(config)):
        client = mlflow_client(config)
        version = find_version(client, name, config.run_uid)
        if version is None:
            created = create_version(client, config, name, hf_dir)
            version = find_version(client, name, config.run_uid) or created
        else:
            log.info("run %s is already registered as %s version %s", config.run_uid, name, version.version)
        return describe(client, version)


def retry_seconds() -> float:
    raw = os.environ.get(RETRY_SECONDS_VARIABLE, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise UserError(f"{RETRY_SECONDS_VARIABLE}={raw!r} is not a number of seconds",
                        "InvalidConfig") from None


def with_retries(operation: Callable[[], dict], budget_s: float, *,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> dict:
    """`operation()`, tried again with exponential backoff while MLflow is unavailable, for up
    to `budget_s`; then its last error, saying how long it was tried."""
    deadline, delay, attempt = clock() + budget_s, FIRST_RETRY_DELAY, 1
    while True:
        try:
            return operation()
        except TransientError as error:
            left = deadline - clock()
            if left <= 0:
                raise TransientError(f"{error.message} (still failing after {attempt} attempts "
                                     f"in {budget_s:g}s)", error.reason) from error
            wait = min(delay, left)
            attempt += 1
            log.warning("%s; retrying in %.0fs (attempt %d)", error.message, wait, attempt)
            sleep(wait)
            delay = min(delay * 2, MAX_RETRY_DELAY)


# --- inputs -----------------------------------------------------------------------------------

def model_name(register_to: str) -> str:
    if not MODEL_NAME.fullmatch(register_to):
        raise UserError(f"registerTo {register_to!r} is not a model name catalog.schema.name "
                        "(letters, digits, '_' and '-' in each part)", "InvalidModelName")
    return register_to


def converted_folder(config: RunConfig) -> Path:
    hf_dir = Path(config.hf_dir)
    if not (hf_dir / HF_MARKER).is_file():  # the marker is written last: no marker, no complete folder
        raise UserError(f"no converted model in {hf_dir}: run the convert step first", "ModelFolderMissing")
    return hf_dir


def training_run(config: RunConfig) -> dict[str, str] | None:
    """The MLflow run of the training, as the train step recorded it."""
    try:
        recorded = json.loads(Path(config.path(TRAIN_RESULT_FILE)).read_text())
    except (OSError, ValueError):
        return None
    mlflow_ids = recorded.get("mlflow") or {}
    return mlflow_ids if mlflow_ids.get("runId") else None


def mlflow_client(config: RunConfig):
    import mlflow

    uri = tracking_uri(config)
    # Also the process-wide default: uploads to `mlflow-artifacts:` (artifacts proxied by the
    # server) resolve the server from it, not from the client.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow and network failures as step errors: a wrong request is permanent, the rest retries."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        message = f"MLflow at {uri}: {_first_line(error.message)}"
        if error.error_code in PERMANENT_CODES:
            raise UserError(message, "RegistrationRejected") from error
        raise TransientError(message, UNAVAILABLE) from error
    except (requests.RequestException, OSError) as error:
        raise TransientError(f"MLflow at {uri}: {_first_line(str(error))}", UNAVAILABLE) from error


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


# --- the registry -----------------------------------------------------------------------------

def find_version(client, name: str, run_uid: str):
    """The version this run registered, if any: the oldest; younger ones (a retried create, a
    race of two finalize pods) are deleted."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{RUN_UID_TAG}` = '{run_uid}'")
    found = sorted(found, key=lambda version: int(version.version))
    for duplicate in found[1:]:
        log.warning("deleting %s version %s: run %s is already version %s", name, duplicate.version,
                    run_uid, found[0].version)
        client.delete_model_version(name, duplicate.version)
    return found[0] if found else None


def create_version(client, config: RunConfig, name: str, hf_dir: Path):
    run_id = run_for_model(client, config)
    source = log_model(client, run_id, hf_dir, config)
    ensure_registered_model(client, name)
    return client.create_model_version(
        name, source, run_id=run_id, description=describe_model(config, run_id),
        tags={RUN_UID_TAG: config.run_uid, RUN_NAME_TAG: config.run_name, TRAINING_RUN_TAG: run_id},
    )


def run_for_model(client, config: RunConfig) -> str:
    """The training's MLflow run; without one, this run's own (found by uid, else created once)."""
    from mlflow.entities import Param

    recorded = training_run(config)
    if recorded:
        return client.get_run(recorded["runId"]).info.run_id  # fails clearly if it is not there
    experiment_id = ensure_experiment(client, config.experiment_path)
    existing = client.search_runs([experiment_id], f"tags.`{RUN_UID_TAG}` = '{config.run_uid}'",
                                  max_results=1)
    run = existing[0] if existing else client.create_run(
        experiment_id, run_name=config.run_name,
        tags={RUN_UID_TAG: config.run_uid, RUN_NAME_TAG: config.run_name})
    # Logged again on a retry: MLflow accepts a param logged twice with the same value.
    params = [Param(key, str(value)) for key, value in run_params(config).items()]
    client.log_batch(run.info.run_id, params=params)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def run_params(config: RunConfig) -> dict[str, Any]:
    """The spec's parameters a person compares fine-tunes by."""
    return {"model": config.model, "task_type": config.task_type.value,
            "train_data_path": config.train_data_path, "training_duration": config.training_duration,
            "learning_rate": config.learning_rate, "context_length": config.context_length,
            "global_batch_size": config.global_batch_size, "seed": config.seed}


def ensure_experiment(client, path: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(path)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(path)
    except MlflowException as error:  # created meanwhile by someone else
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(path).experiment_id


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Fine-tuned by kubetune.")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def log_model(client, run_id: str, hf_dir: Path, config: RunConfig) -> str:
    """Save the folder as an MLflow transformers model and upload it to the run; its URI.

    Re-uploading to the same run and path on a retry overwrites the same files: no duplicates.
    """
    import mlflow.transformers

    # Next to hf_dir on the run's storage: /tmp of a finalize pod may not hold a large model.
    with tempfile.TemporaryDirectory(dir=Path(hf_dir).parent, prefix=".register-") as scratch:
        local = Path(scratch) / MODEL_ARTIFACT
        mlflow.transformers.save_model(
            transformers_model=str(hf_dir), path=str(local), task=inference_task(hf_dir),
            model_card=model_card(config), pip_requirements=pip_requirements(),
        )
        client.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    return f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"


def inference_task(hf_dir: Path) -> str:
    """OpenAI-style chat when the tokenizer has a chat template, plain completions otherwise."""
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    has_template = (hf_dir / "chat_template.jinja").is_file() or tokenizer_config.get("chat_template")
    return "llm/v1/chat" if has_template else "llm/v1/completions"


def pip_requirements() -> list[str]:
    # Given explicitly: inferring them would load the model in a subprocess.
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for package in ("transformers", "torch", "tokenizers", "safetensors", "accelerate"):
        with contextlib.suppress(PackageNotFoundError):
            pinned.append(f"{package}=={version(package)}")
    return pinned


def model_card(config: RunConfig):
    # Given explicitly: mlflow otherwise looks the card up on the hub under the folder's path.
    from huggingface_hub import ModelCard

    return ModelCard(f"---\nlibrary_name: transformers\ntags: [kubetune]\n---\n"
                     f"# {config.register_to}\n\n{describe_model(config, None)}\n")


def describe_model(config: RunConfig, run_id: str | None) -> str:
    text = (f"{config.model} fine-tuned by kubetune run {config.namespace}/{config.run_name} "
            f"({config.task_type.value}, {config.training_duration}, learning rate "
            f"{config.learning_rate:g}, data {config.train_data_path}).")
    return f"{text} Training MLflow run: {run_id}." if run_id else text


def describe(client, version) -> dict[str, Any]:
    run = client.get_run(version.run_id)
    return {
        "registeredModel": {"name": version.name, "version": str(version.version),
                            "artifactUri": f"{version.source}/{HF_SUBFOLDER}"},
        "mlflow": {"experimentId": run.info.experiment_id, "runId": run.info.run_id},
    }

