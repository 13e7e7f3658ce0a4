"""`kubetune get|list|events|cancel|delete`: the pure parts (tables, documents, names from files,
the parser's kubectl habits) and the exit codes of errors that need no cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from kubetune import cli
from kubetune.cli_runs import age, events_table, headers, names_in_files, render, row, table
from kubetune.foundation_model.types import run_from_resource

NOW = datetime(2026, 1, 2, 4, 0, 0, tzinfo=timezone.utc)


def resource(name: str, phase: str | None = None, **status) -> dict:
    body = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": "team", "creationTimestamp": "2026-01-02T03:00:00Z"},
            "spec": {"model": "Qwen/Qwen2.5-0.5B", "trainDataPath": "/d/t.jsonl", "registerTo": "main.ml"}}
    if phase:
        body["status"] = {"phase": phase, **status}
    return body


RUNS = [run_from_resource(resource("alpha", "Training", progress={"percent": 41.6, "tokensPerSecond": 812.4,
                                                                  "loss": 1.23456, "etaSeconds": 90}), NOW),
        run_from_resource(resource("beta", "Succeeded", registeredModel={"name": "main.ml.beta", "version": "2"}), NOW)]


@pytest.mark.parametrize("seconds, shown", [(5, "5s"), (59, "59s"), (60, "1m"), (3599, "59m"), (7200, "2h"),
                                            (3 * 86400 + 5, "3d")])
def test_age_is_shown_as_kubectl_shows_it(seconds, shown):
    assert age(NOW - timedelta(seconds=seconds), NOW) == shown


def test_the_table_has_kubectl_columns_and_service_statuses():
    text = render(RUNS, None, all_namespaces=False, single=False, now=NOW)
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "MODEL", "PROGRESS", "AGE"]
    assert lines[1].split() == ["alpha", "RUNNING", "Qwen/Qwen2.5-0.5B", "42%", "1h"]
    assert lines[2].split() == ["beta", "COMPLETED", "Qwen/Qwen2.5-0.5B", "-", "1h"]
    assert lines[0].index("STATUS") == lines[1].index("RUNNING")  # aligned columns


def test_wide_and_all_namespaces_add_their_columns():
    assert headers(True, True)[:2] == ["NAMESPACE", "NAME"] and "PHASE" in headers(True, False)
    cells = row(RUNS[0], NOW, wide=True, all_namespaces=True)
    assert cells[:3] == ["team", "alpha", "RUNNING"]
    assert dict(zip(headers(True, True), cells))["TOKENS/S"] == "812"
    assert dict(zip(headers(True, True), cells))["LOSS"] == "1.235"
    assert dict(zip(headers(True, True), cells))["PHASE"] == "Training"
    assert dict(zip(headers(True, False), row(RUNS[1], NOW, True, False)))["REGISTERED"] == "main.ml.beta v2"


def test_json_yaml_and_name_outputs_are_kubectls():
    managed = run_from_resource({**resource("alpha"), "metadata": {**resource("alpha")["metadata"],
                                                                   "managedFields": [{"manager": "kopf"}]}}, NOW)
    one = json.loads(render([managed], "json", False, single=True, now=NOW))
    assert one["kind"] == "TrainingRun" and one["metadata"]["name"] == "alpha"
    assert "managedFields" not in one["metadata"]  # as kubectl, unless asked
    many = yaml.safe_load(render(RUNS, "yaml", False, single=False, now=NOW))
    assert many["kind"] == "List" and [i["metadata"]["name"] for i in many["items"]] == ["alpha", "beta"]
    assert render(RUNS, "name", False, single=False, now=NOW).splitlines() == [
        "trainingrun.kubetune.dev/alpha", "trainingrun.kubetune.dev/beta"]
    assert render([], None, False, single=False, now=NOW) == ""


def test_table_pads_columns_and_trims_line_ends():
    assert table([["A", "BB"], ["ccc", "d"]]) == "A     BB\nccc   d"


def test_events_table_lists_time_type_message():
    run = run_from_resource(resource("alpha", "Training", events=[
        {"type": "CREATED", "time": "2026-01-02T03:00:01Z", "message": "TrainingRun created"}]), NOW)
    assert events_table(run).splitlines()[1].split() == ["2026-01-02T03:00:01Z", "CREATED", "TrainingRun", "created"]


def test_names_come_from_every_trainingrun_in_the_files(tmp_path):
    path = tmp_path / "runs.yaml"
    path.write_text(yaml.safe_dump_all([resource("alpha"), {"kind": "ConfigMap", "metadata": {"name": "x"}},
                                        {**resource("beta"), "metadata": {"name": "beta", "namespace": "other"}}]))
    assert names_in_files([str(path)]) == [("alpha", "team"), ("beta", "other")]


@pytest.mark.parametrize("content, words", [
    (None, ["cannot read"]), ("a: [", ["not valid YAML"]), ("kind: ConfigMap\n", ["holds no TrainingRun"]),
    ("kind: TrainingRun\nmetadata: {}\n", ["without metadata.name"]),
])
def test_bad_files_are_cli_errors(tmp_path, content, words):
    path = tmp_path / "run.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(cli.CliError) as raised:
        names_in_files([str(path)])
    assert all(w in str(raised.value) for w in words)


def test_the_parser_takes_kubectls_flags():
    parse = cli.parser().parse_args
    args = parse(["get", "a", "b", "-n", "team", "-o", "wide", "-w", "-l", "team=nlp"])
    assert (args.names, args.namespace, args.output, args.watch, args.selector) == (["a", "b"], "team", "wide", True, "team=nlp")
    assert parse(["get", "-A", "-o", "name"]).all_namespaces
    assert parse(["delete", "-f", "x.yaml", "-f", "y.yaml"]).filename == ["x.yaml", "y.yaml"]
    events = parse(["events", "a", "-f"])
    assert events.follow and events.names == ["a"]
    assert parse(["list", "--statuses", "RUNNING", "COMPLETED", "--limit", "5"]).statuses == ["RUNNING", "COMPLETED"]


def kubetune(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *argv], capture_output=True, text=True,
                          timeout=60, env=env)


def test_version_and_usage_errors():
    from kubetune.settings import operator_version

    assert kubetune("--version").stdout.strip() == f"kubetune {operator_version()}"
    bad = kubetune("get", "-o", "table")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_unknown_statuses_and_no_cluster_are_one_line_errors_with_their_exit_codes(tmp_path):
    import os

    env = {**os.environ, "KUBECONFIG": str(tmp_path / "absent"), "KUBERNETES_SERVICE_HOST": "",
           "HOME": str(tmp_path)}
    unknown = kubetune("list", "--statuses", "DONE", env=env)
    assert unknown.returncode == 1 and "unknown status 'DONE'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    nowhere = kubetune("get", env=env)
    assert nowhere.returncode == 4 and "no Kubernetes cluster configured" in nowhere.stderr
    assert "KUBECONFIG" in nowhere.stderr and "Traceback" not in nowhere.stderr
