"""`python -m kubetune_trainer <step> --config PATH`: thin entry points, one per pod kind.

Each step is a library function `run_<step>(config) -> dict` returning the fields of its result
document; this module only parses arguments, maps errors to exit codes and writes the result.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

from .config import RunConfig, load_config
from .contract import ENV_RANK, EXIT_OK, EXIT_RETRYABLE
from .errors import SAVED_KEPT, StepError, TransientError, UserError, storage_full, user_error_of
from .results import exit_code, failure, write_result
from .storage import staged

log = logging.getLogger("kubetune_trainer")

# step name -> (module, function); imported lazily so `prepare` never pays for Composer.
STEPS: dict[str, tuple[str, str]] = {
    "prepare": ("kubetune_trainer.data", "run_prepare"),
    "train": ("kubetune_trainer.train", "run_train"),
    "convert": ("kubetune_trainer.convert", "run_convert"),
    "register": ("kubetune_trainer.register", "run_register"),
    "finalize": ("kubetune_trainer.cli", "run_finalize"),
}


def step_function(step: str) -> Callable[[RunConfig], dict]:
    module, name = STEPS[step]
    return getattr(importlib.import_module(module), name)


def run_finalize(config: RunConfig) -> dict:
    """Off the GPU pods: Composer checkpoint -> Hugging Face folder -> MLflow registry."""
    converted = step_function("convert")(config)
    return {**converted, **step_function("register")(config)}


def is_rank_zero() -> bool:
    import os

    return os.environ.get(ENV_RANK, "0") == "0"


def run_step(step: str, config_path: str) -> int:
    try:
        config = load_config(config_path)
    except (OSError, ValueError) as error:
        return report(step, UserError(f"config {config_path}: {first_line(error)}", "InvalidConfig"))
    try:
        with staged(step, config) as local:  # a no-op unless work_dir is an object store
            fields = step_function(step)(local)
    except StepError as error:
        return report(step, error)
    except KeyboardInterrupt:
        return report(step, StepError("interrupted", "Interrupted"))
    except Exception as error:  # an unexpected bug: one line for the status, traceback to the log
        # A full disk in any step (training names its checkpoints itself): the user's to fix.
        if known := user_error_of(error) or storage_full(error, config.work_dir, advice=SAVED_KEPT):
            return report(step, known)
        log.exception("step %s failed", step)
        return report(step, StepError(f"{type(error).__name__}: {first_line(error)}", "InternalError"))
    if is_rank_zero():
        write_result(step, True, **fields)
    return EXIT_OK


def report(step: str, error: StepError) -> int:
    print(f"kubetune {step}: {error.reason}: {error.message}", file=sys.stderr)
    if is_rank_zero() or error.permanent:
        failure(step, error)
    return exit_code(error) if isinstance(error, StepError) else EXIT_RETRYABLE


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def cleanup(work_dir: str) -> int:
    from .cleanup import run_cleanup

    try:
        fields = run_cleanup(work_dir)
    except StepError as error:
        return report("cleanup", error)
    except OSError as error:
        return report("cleanup", TransientError(f"cleanup of {work_dir}: {first_line(error)}",
                                                "StorageUnavailable"))
    write_result("cleanup", True, **fields)
    return EXIT_OK


def tiny_model(out: str) -> int:
    from .tinymodel import build_tiny_model

    print(build_tiny_model(out))
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kubetune-trainer", description=__doc__)
    sub = top.add_subparsers(dest="step", required=True)
    for step in STEPS:
        sub.add_parser(step).add_argument("--config", required=True, help="resolved run config JSON")
    sub.add_parser("tiny-model", help="build the tiny test model").add_argument("out")
    sub.add_parser("cleanup", help="remove a deleted run's folder").add_argument("--work-dir", required=True)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    if args.step == "tiny-model":
        return tiny_model(args.out)
    if args.step == "cleanup":
        return cleanup(args.work_dir)
    return run_step(args.step, args.config)
