"""`kubetune get | list | events | cancel | delete`: the SDK from the shell, with kubectl's habits.

`-n/--namespace` (default: the kubeconfig context's), `-A/--all-namespaces`, `-o
wide|json|yaml|name`, `-w/--watch`, `-l/--selector`, runs by name or from `-f run.yaml` files
(`events` follows with `-f`, so it takes files as `--filename`). Statuses are the service's
(PENDING ... FAILED); the table also shows the resource's phase with `-o wide`.

Exit codes: 0 done (for `events -f`: the run COMPLETED); 1 invalid input, or the followed run
FAILED or was STOPPED; 2 a usage error; 3 a run not found; 4 no cluster reachable or the CRD not
installed; 5 permission denied; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .api import GROUP, KIND, PLURAL
from .cli import CliError
from .foundation_model.errors import FoundationModelError
from .foundation_model.follow import TerminalDisplay, progress_text
from .foundation_model.query import Filters, parse_status, select
from .foundation_model.runs import cancel_active, follow_run, resolve_targets
from .foundation_model.types import RunStatus, TrainingRun, run_from_resource

EXIT_RUN_DID_NOT_COMPLETE = 1
OUTPUTS = ("wide", "json", "yaml", "name")
RESOURCE = f"{KIND.lower()}.{GROUP}"


# --- formatting (pure) -------------------------------------------------------------------------

def age(since: datetime | None, now: datetime) -> str:
    """kubectl's AGE: 45s, 12m, 5h, 3d."""
    if since is None:
        return "<unknown>"
    seconds = max(int((now - since).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def headers(wide: bool, all_namespaces: bool) -> list[str]:
    columns = ["NAME", "STATUS", "MODEL", "PROGRESS", "AGE"]
    if wide:
        columns += ["PHASE", "TASK", "TOKENS/S", "LOSS", "ETA", "REGISTERED", "CREATED BY"]
    return (["NAMESPACE"] if all_namespaces else []) + columns


def row(run: TrainingRun, now: datetime, wide: bool, all_namespaces: bool) -> list[str]:
    progress = run.progress
    cells = [run.name, str(run.status), run.model or "",
             f"{progress.percent:.0f}%" if progress is not None else "-", age(run.created_at, now)]
    if wide:
        model = run.registered_model
        cells += [run.phase, run.task_type or "",
                  _number(progress.tokens_per_second if progress else None, 0),
                  _number(progress.loss if progress else None, 3), run.formatted_eta or "-",
                  f"{model.name} v{model.version}" if model else "-", run.created_by or ""]
    return ([run.namespace] if all_namespaces else []) + cells


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded as kubectl pads them: left aligned, three spaces apart."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows)


def shown(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource as kubectl prints it: without metadata.managedFields."""
    meta = {k: v for k, v in (resource.get("metadata") or {}).items() if k != "managedFields"}
    return {**resource, "metadata": meta}


def as_document(resources: Sequence[dict[str, Any]], single: bool) -> dict[str, Any]:
    """One resource as itself, several as a `List`, as kubectl prints them."""
    if single and len(resources) == 1:
        return shown(resources[0])
    return {"apiVersion": "v1", "kind": "List", "items": [shown(r) for r in resources],
            "metadata": {"resourceVersion": ""}}


def render(runs: Sequence[TrainingRun], output: str | None, all_namespaces: bool, single: bool,
           now: datetime) -> str:
    if output == "name":
        return "\n".join(f"{RESOURCE}/{run.name}" for run in runs)
    if output in ("json", "yaml"):
        document = as_document([run.resource for run in runs], single)
        return json.dumps(document, indent=4) if output == "json" else yaml.safe_dump(document, sort_keys=False).rstrip()
    if not runs:
        return ""
    wide = output == "wide"
    return table([headers(wide, all_namespaces), *(row(run, now, wide, all_namespaces) for run in runs)])


def events_table(run: TrainingRun) -> str:
    rows = [["TIME", "TYPE", "MESSAGE"]]
    rows += [[f"{e.time:%Y-%m-%dT%H:%M:%SZ}", e.type, e.message] for e in run.events or []]
    return table(rows)


# --- which runs ----------------------------------------------------------------------------------

def names_in_files(paths: Iterable[str]) -> list[tuple[str, str | None]]:
    """(name, namespace or None) of every TrainingRun in the YAML files, as `kubectl -f` reads them."""
    found = []
    for path in paths:
        try:
            documents = list(yaml.safe_load_all(Path(path).read_text()))
        except OSError as error:
            raise CliError(f"{path}: cannot read: {error.strerror or error}") from error
        except yaml.YAMLError as error:
            raise CliError(f"{path}: not valid YAML: {getattr(error, 'problem', error)}") from error
        runs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
        if not runs:
            raise CliError(f"{path}: holds no {KIND}")
        for document in runs:
            meta = document.get("metadata") or {}
            if not meta.get("name"):
                raise CliError(f"{path}: a {KIND} without metadata.name")
            found.append((meta["name"], meta.get("namespace")))
    return found


def requested(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    files = getattr(args, "filename", None) or []
    return [(name, None) for name in args.names] + names_in_files(files)


# --- commands ------------------------------------------------------------------------------------

def _connect(args: argparse.Namespace, namespace: str | None = None):
    from .foundation_model.client import connect  # the kubernetes client loads only for these verbs

    return connect(namespace or args.namespace)


def cmd_get(args: argparse.Namespace) -> int:
    wanted = requested(args)
    if wanted and args.all_namespaces:
        raise CliError("a run name or -f file goes with -n NAMESPACE, not with -A")
    with _connect(args) as runs:
        if wanted:
            found = [run_from_resource(runs.get(name, namespace)) for name, namespace in wanted]
        else:
            items = runs.list(all_namespaces=args.all_namespaces, selector=args.selector).get("items") or []
            found = select([run_from_resource(item) for item in items], Filters())
        show(found, args, len(wanted) == 1, runs.namespace)
        if args.watch:
            watch(runs, args, found, {name for name, _ in wanted})
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    statuses = [parse_status(s) for s in _split(args.statuses)] if args.statuses else None
    filters = Filters(statuses=frozenset(statuses) if statuses else None, limit=args.limit)
    with _connect(args) as runs:
        items = runs.list(all_namespaces=args.all_namespaces, selector=args.selector).get("items") or []
        found = select([run_from_resource(item) for item in items], filters)
        show(found, args, False, runs.namespace)
        if args.watch:
            watch(runs, args, found, set(), filters.statuses)
    return 0


def _split(values: Sequence[str]) -> list[str]:
    return [part for value in values for part in value.split(",") if part.strip()]


def show(found: list[TrainingRun], args: argparse.Namespace, single: bool, namespace: str) -> None:
    text = render(found, args.output, args.all_namespaces, single, datetime.now(timezone.utc))
    if text:
        print(text, flush=True)
    elif args.output not in ("json", "yaml", "name"):  # as kubectl: a note on stderr, exit 0
        print(f"No TrainingRuns found in {'any namespace' if args.all_namespaces else namespace + ' namespace'}.",
              file=sys.stderr)


def _version(resource: dict[str, Any]) -> tuple[str, str, str]:
    meta = resource.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", ""), meta.get("resourceVersion", "")


def watch(runs, args: argparse.Namespace, shown: list[TrainingRun], names: set[str],
          statuses: frozenset[RunStatus] | None = None) -> None:
    """Print a row (or a document) for every later change, as `kubectl get -w` does."""
    printed = {_version(run.resource) for run in shown}
    name = next(iter(names)) if len(names) == 1 else None
    for kind, resource in runs.watch(all_namespaces=args.all_namespaces, selector=args.selector, name=name):
        if kind != "DELETED" and _version(resource) in printed:
            continue  # the watch starts with what was just shown
        run = run_from_resource(resource)
        if (names and run.name not in names) or (statuses and run.status not in statuses):
            continue
        if args.output in ("json", "yaml", "name"):
            print(render([run], args.output, args.all_namespaces, True, datetime.now(timezone.utc)), flush=True)
        else:
            cells = row(run, datetime.now(timezone.utc), args.output == "wide", args.all_namespaces)
            if kind == "DELETED":
                cells[1 + args.all_namespaces] = "DELETED"
            print("   ".join(cells), flush=True)


def cmd_events(args: argparse.Namespace) -> int:
    wanted = requested(args)
    if len(wanted) != 1:
        raise CliError(f"events takes one run (a name or --filename), got {len(wanted)}")
    name, namespace = wanted[0]
    with _connect(args, namespace) as runs:
        run = run_from_resource(runs.get(name))
        if not args.follow:
            print(events_table(run))
            if run.progress is not None and not run.status.is_terminal():
                print(f"progress: {progress_text(run.progress)}")
            return 0
        ended = follow_run(runs, name, TerminalDisplay(sys.stdout))
    return 0 if ended.status is RunStatus.COMPLETED else EXIT_RUN_DID_NOT_COMPLETE


def cmd_cancel(args: argparse.Namespace) -> int:
    wanted = _one_or_more(args, "cancel")
    with _connect(args) as runs:
        targets = [run for name, ns in wanted for run in resolve_targets(runs, [name], ns)]
        cancelled = {run.name for run in cancel_active(runs, targets)}
    for run in targets:
        print(f"{RESOURCE}/{run.name} {'cancelled' if run.name in cancelled else f'already {run.status}'}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    wanted = _one_or_more(args, "delete")
    with _connect(args) as runs:
        targets = [run for name, ns in wanted for run in resolve_targets(runs, [name], ns)]
        for run in targets:
            runs.delete(run.name, run.namespace)
            print(f'{RESOURCE} "{run.name}" deleted')
    return 0


def _one_or_more(args: argparse.Namespace, verb: str) -> list[tuple[str, str | None]]:
    wanted = requested(args)
    if not wanted:
        raise CliError(f"{verb} needs run names or -f FILE")
    return wanted


def sdk_errors(command):
    """An SDK error ends the command with its message and its exit code."""
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except FoundationModelError as error:
            raise CliError(str(error), error.exit_code) from error
    return run


# --- the parser -----------------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser, *, files: str = "-f") -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="TrainingRun names")
    flags = ("-f", "--filename") if files == "-f" else ("--filename",)
    parser.add_argument(*flags, dest="filename", action="append", metavar="FILE",
                        help="the TrainingRun(s) in this YAML file (repeatable)")
    parser.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")


def _listing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="runs of every namespace")
    parser.add_argument("-o", "--output", choices=OUTPUTS, help="wide, json, yaml or name")
    parser.add_argument("-w", "--watch", action="store_true", help="then print every change")
    parser.add_argument("-l", "--selector", help="label selector, e.g. team=nlp,stage!=test")


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    get = sub.add_parser("get", help=f"show {PLURAL} (all in the namespace, or those named)")
    _common(get)
    _listing(get)
    get.set_defaults(func=sdk_errors(cmd_get))

    listing = sub.add_parser("list", help=f"list {PLURAL}, newest first, by service status")
    listing.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    _listing(listing)
    listing.add_argument("--statuses", nargs="+", metavar="STATUS",
                         help=f"only runs in these statuses: {', '.join(s.value for s in RunStatus)}")
    listing.add_argument("--limit", type=int, help="at most this many runs")
    listing.set_defaults(func=sdk_errors(cmd_list))

    events = sub.add_parser("events", help="a run's events; -f follows them with a progress bar")
    _common(events, files="--filename")
    events.add_argument("-f", "--follow", action="store_true",
                        help="follow until the run ends; exit 1 unless it COMPLETED")
    events.set_defaults(func=sdk_errors(cmd_events))

    cancel = sub.add_parser("cancel", help="stop runs; they end STOPPED and stay listed")
    _common(cancel)
    cancel.set_defaults(func=sdk_errors(cmd_cancel))

    delete = sub.add_parser("delete", help="delete runs and everything they made")
    _common(delete)
    delete.set_defaults(func=sdk_errors(cmd_delete))
