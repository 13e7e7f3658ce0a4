"""`kubetune`: run a TrainingRun locally, validate one before any GPU is asked for, run the operator.

Errors reach a person as a few clear lines and a non-zero exit code, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .api import KIND, SpecError, parse_training_run

EXIT_OK, EXIT_INVALID, EXIT_FAILED = 0, 1, 1
# A run file is a Kubernetes object: the API server stores at most ~1.5 MiB per object, so a
# larger file is a mistake (a data file passed by accident), refused before it is read.
MAX_RUN_FILE_BYTES = 1024 * 1024


class KubernetesYamlLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: `1e-5` is a number there (YAML 1.2), a string to PyYAML (1.1)."""


KubernetesYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


class CliError(Exception):
    """A problem to print as is, with the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_INVALID):
        super().__init__(message)
        self.code = code


def load_document(path: str) -> dict[str, Any]:
    text = read_run_file(path)
    try:
        documents = [d for d in yaml.load_all(text, Loader=KubernetesYamlLoader) if d is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise CliError(f"{path}{where}: not valid YAML: {getattr(error, 'problem', error)}") from error
    runs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(runs) != 1:
        raise CliError(f"{path}: expected exactly one {KIND} document (apiVersion: kubetune.dev/v1alpha1,"
                       f" kind: {KIND}), found {len(runs)}: {describe_documents(documents)}")
    return runs[0]


def read_run_file(path: str) -> str:
    try:
        size = Path(path).stat().st_size
        if size > MAX_RUN_FILE_BYTES:
            raise CliError(f"{path}: {size} bytes, larger than a TrainingRun can be"
                           f" ({MAX_RUN_FILE_BYTES} bytes); is it the run's YAML file?")
        return Path(path).read_bytes().decode("utf-8-sig")
    except OSError as error:
        raise CliError(f"{path}: cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise CliError(f"{path}: not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x});"
                       " a TrainingRun is a YAML file") from error


def describe_documents(documents: list[Any]) -> str:
    """What a file holds instead of one TrainingRun, e.g. `2 documents: kind Secret, a list`."""
    if not documents:
        return "the file is empty"
    kinds = [f"kind {d.get('kind')}" if isinstance(d, dict) and d.get("kind") else
             "a mapping without `kind`" if isinstance(d, dict) else f"a {type(d).__name__}"
             for d in documents]
    return f"{len(documents)} document{'s' if len(documents) > 1 else ''}: {', '.join(kinds)}"


def parse_or_explain(body: dict[str, Any], path: str):
    try:
        return parse_training_run(body)
    except SpecError as error:
        raise CliError(f"{path}: invalid {KIND}:\n{error}") from error


def local_run_body(document: dict[str, Any], path: str, workdir: Path):
    """(body, run) to run here. The spec is judged as written first, as the API server would judge
    it, so a file that passes here passes there; then with its local paths made absolute."""
    from .local import local_body

    body = local_body(document, Path.cwd(), workdir)
    parse_or_explain({**body, "spec": document.get("spec")}, path)
    return body, parse_or_explain(body, path)


# --- run --local -------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise CliError("`kubetune run` needs --local (use `kubectl apply -f` for a cluster)")
    from .local import LocalRun, local_settings

    document = load_document(args.file)
    workdir = Path(args.workdir or ".kubetune")
    body, _ = local_run_body(document, args.file, workdir)
    run = LocalRun(body, workdir, local_settings(workdir))
    print(f"kubetune: running {body['metadata']['name']} locally in {run.workdir}")
    phase = run.run()
    return report_outcome(run.body, phase, run)


def report_outcome(body: dict[str, Any], phase: str, run) -> int:
    status = body.get("status") or {}
    if phase != "Succeeded":
        failed = next((c for c in status.get("conditions") or []
                       if c.get("type") == "Failed" and c.get("status") == "True"), {})
        print(f"kubetune: {phase}: {failed.get('reason', '')}: {failed.get('message', '')}".rstrip(": "),
              file=sys.stderr)
        print(f"  logs: {run.folder}", file=sys.stderr)
        return EXIT_FAILED
    model = status.get("registeredModel") or {}
    config = run.config()
    tracking_uri = run.settings.mlflow_tracking_uri
    print(f"registered model: {model.get('name')} version {model.get('version')}")
    print(f"model URI:        models:/{model.get('name')}/{model.get('version')}")
    print(f"model folder:     {config.hf_dir if config else model.get('artifactUri')}")
    print(f"MLflow store:     {tracking_uri}")
    print(f"MLflow UI:        {mlflow_ui_hint(tracking_uri)}")
    return EXIT_OK


def mlflow_ui_hint(tracking_uri: str) -> str:
    """How to look at the run: a server's address as is, an embedded store through `mlflow ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    return f"mlflow ui --backend-store-uri {tracking_uri}  (then open http://127.0.0.1:5000)"


# --- validate ----------------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from .local import local_settings
    from .resolve import resolve_config

    document = load_document(args.file)
    with tempfile.TemporaryDirectory() as scratch:
        _, run = local_run_body(document, args.file, Path(scratch))
        print(f"{args.file}: spec valid")
        try:
            from kubetune_trainer.data import analyze
        except ModuleNotFoundError as missing:  # any other ImportError is a defect: it surfaces
            print(data_checks_skipped(missing.name or ""))
            return EXIT_OK
        config = resolve_config(run, local_settings(Path(scratch)))
        return report_data(analyze, config, args.file)


def data_checks_skipped(missing_module: str) -> str:
    """Why the data checks cannot run: the trainer extra is absent, or installed incompletely."""
    if missing_module.split(".")[0] == "kubetune_trainer":
        return "data checks skipped: install kubetune[trainer] to check data and count tokens"
    return (f"data checks skipped: kubetune[trainer] is installed without its dependency "
            f"{missing_module!r}; reinstall it (pip install 'kubetune[trainer]') to check data")


def report_data(analyze, config, path: str) -> int:
    from kubetune_trainer.errors import StepError

    from kubetune_trainer.errors import user_error_of

    try:
        report = analyze(config)
    except StepError as error:
        raise CliError(f"{path}: {error.reason}: {error.message}") from error
    except Exception as error:
        known = user_error_of(error)
        if known is None:
            raise
        raise CliError(f"{path}: {known.reason}: {known.message}") from error
    print(f"data valid: {config.train_data_path}")
    print_stats(report.stats, report.context_length)
    print(f"  {'batches per epoch (batch ' + str(config.global_batch_size) + ')':<34} "
          f"{report.batches_per_epoch(config.global_batch_size)}")
    if report.eval is not None:
        print(f"eval data valid: {config.eval_data_path}")
        print_stats(report.eval.stats, report.context_length)
    return EXIT_OK


def print_stats(stats, context_length: int) -> None:
    for label, value in [("samples", stats.samples), ("tokens", stats.tokens),
                         (f"truncated at {context_length}", stats.truncated_samples),
                         ("dropped (no token left to learn)", stats.dropped_samples),
                         ("packed sequences", stats.sequences),
                         ("packing efficiency", f"{stats.packing_efficiency:.1%}")]:
        print(f"  {label:<34} {value}")


# --- operator ----------------------------------------------------------------------------------

def cmd_operator(_: argparse.Namespace) -> int:
    from kubernetes.config import ConfigException

    from .k8s.main import run_operator

    try:
        return run_operator()
    except ConfigException as error:
        raise CliError("operator: no Kubernetes API to talk to: not in a pod with a ServiceAccount and"
                       f" no usable kubeconfig ({error}); set KUBECONFIG or run it in the cluster") from error


def parser() -> argparse.ArgumentParser:
    from .cli_runs import add_run_commands
    from .settings import operator_version

    top = argparse.ArgumentParser(prog="kubetune", description="Fine-tune LLMs on Kubernetes.")
    top.add_argument("--version", action="version", version=f"kubetune {operator_version()}")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a TrainingRun end to end")
    run.add_argument("file")
    run.add_argument("--local", action="store_true", help="as local processes, on this machine")
    run.add_argument("--workdir", help="where data, checkpoints, MLflow store go (default .kubetune)")
    run.set_defaults(func=cmd_run)
    validate = sub.add_parser("validate", help="pre-flight: spec and data checks, statistics")
    validate.add_argument("file")
    validate.set_defaults(func=cmd_validate)
    sub.add_parser("operator", help="run the operator").set_defaults(func=cmd_operator)
    add_run_commands(sub)  # get, list, events, cancel, delete
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as error:
        print(f"kubetune: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug of ours: one line for the person, the trace on request
        if os.environ.get("KUBETUNE_DEBUG"):
            raise
        print(f"kubetune: internal error: {type(error).__name__}: {error}\n"
              "  (run again with KUBETUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    # As `python -m kubetune.cli`, this file is `__main__`; the command modules import
    # `kubetune.cli`, so run that module's main to catch their CliError.
    from kubetune.cli import main as package_main

    sys.exit(package_main())
