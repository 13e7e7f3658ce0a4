"""The SDK's pure parts: statuses from phases, resources to run objects, create() arguments to a
spec (judged by the API models), list filters, checkpoints from status, and following a run."""

from __future__ import annotations

import io
import warnings
from datetime import datetime, timedelta, timezone

import pytest

from kubetune import foundation_model as fm
from kubetune.api import EventType, Phase, parse_training_run
from kubetune.foundation_model.checkpoints import checkpoints_of
from kubetune.foundation_model.follow import TerminalDisplay, follow, notebook_html, progress_text
from kubetune.foundation_model.query import Filters, parse_moment, select
from kubetune.foundation_model.spec import build_resource, run_name
from kubetune.foundation_model.types import (
    CANCEL_ANNOTATION,
    RunStatus,
    run_from_resource,
    status_from_phase,
)
from kubetune.reconcile.status import derive_events, event_entries

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def resource(name="run-a", phase=None, annotations=None, **status) -> dict:
    body = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": "team", "creationTimestamp": "2026-01-02T03:00:00Z",
                         "annotations": annotations or {}, "resourceVersion": "7"},
            "spec": {"model": "meta-llama/Llama-3.2-1B-Instruct", "trainDataPath": "/data/train.jsonl",
                     "registerTo": "main.ml"}}
    if phase or status:
        body["status"] = {"phase": phase, **status}
    return body


# --- statuses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("phase, expected", [
    (None, RunStatus.PENDING), ("Pending", RunStatus.PENDING), ("Queued", RunStatus.QUEUED),
    ("Suspended", RunStatus.QUEUED), ("PreparingData", RunStatus.STARTING), ("Training", RunStatus.RUNNING),
    ("Registering", RunStatus.RUNNING), ("Succeeded", RunStatus.COMPLETED), ("Failed", RunStatus.FAILED),
    ("Cancelled", RunStatus.STOPPED), ("SomethingNew", RunStatus.UNKNOWN),
])
def test_each_phase_maps_to_a_service_status(phase, expected):
    assert status_from_phase(phase) is expected


def test_every_phase_of_the_api_has_a_status():
    assert all(status_from_phase(p.value) is not RunStatus.UNKNOWN for p in Phase)


def test_a_run_asked_to_stop_is_terminating_until_it_ends():
    assert status_from_phase("Training", stopping=True) is RunStatus.TERMINATING
    assert status_from_phase("Cancelled", stopping=True) is RunStatus.STOPPED
    cancelled = resource(phase="Training", annotations={CANCEL_ANNOTATION: "true"})
    assert run_from_resource(cancelled, NOW).status is RunStatus.TERMINATING
    deleting = resource(phase="Training")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-02T03:04:00Z"
    assert run_from_resource(deleting, NOW).status is RunStatus.TERMINATING


def test_terminal_statuses_and_order_are_the_services():
    assert {s for s in RunStatus if s.is_terminal()} == {RunStatus.COMPLETED, RunStatus.STOPPED, RunStatus.FAILED}
    assert RunStatus.PENDING < RunStatus.RUNNING < RunStatus.COMPLETED
    assert RunStatus.RUNNING.before(RunStatus.COMPLETED) and RunStatus.COMPLETED.after(RunStatus.RUNNING)
    assert RunStatus.from_string("running") is RunStatus.RUNNING
    assert RunStatus.from_string("nonsense") is RunStatus.UNKNOWN
    assert str(RunStatus.FAILED) == "FAILED" and RunStatus.RUNNING.display_name == "Running"


# --- the run object ----------------------------------------------------------------------------

def test_a_training_run_carries_the_services_attributes_filled_from_the_resource():
    body = resource(
        phase="Training", startTime="2026-01-02T03:01:00Z",
        progress={"percent": 42.0, "tokensPerSecond": 1234.5, "loss": 2.5, "etaSeconds": 600},
        mlflow={"experimentId": "3", "runId": "abc"},
        latestCheckpoint="/mnt/kubetune/team/run-a/checkpoints/ep0-ba10-rank0.pt",
        events=[{"type": "CREATED", "time": "2026-01-02T03:00:01Z", "message": "TrainingRun created"},
                {"type": "TRAIN_STARTED", "time": "2026-01-02T03:01:00Z", "message": "training started"}])
    body["metadata"]["annotations"] = {"kubetune.dev/owner": "ada@example.com"}
    run = run_from_resource(body, NOW)
    assert (run.name, run.status, run.created_by, run.namespace) == ("run-a", RunStatus.RUNNING, "ada@example.com", "team")
    assert run.model == "meta-llama/Llama-3.2-1B-Instruct" and run.task_type == "INSTRUCTION_FINETUNE"
    assert run.training_duration == "1ep" and run.learning_rate == 5e-7 and run.context_length == 8192
    assert run.submitted_experiment_path == "/Users/ada@example.com/run-a"
    assert run.experiment_id == "3" and run.run_id == "abc"
    assert run.save_folder == "/mnt/kubetune/team/run-a/checkpoints"
    assert run.started_at == datetime(2026, 1, 2, 3, 1, tzinfo=timezone.utc)
    assert run.estimated_end_time == NOW + timedelta(seconds=600) and run.formatted_eta == "10min"
    assert [e.type for e in run.events] == ["CREATED", "TRAIN_STARTED"]
    assert run.details == "training started"
    assert run.run_progress == "RUNNING ■■■■□□□□□□(42%)"
    assert run.submitted_config is not None and run.data_prep_cluster_id is None
    assert "<table" in run._repr_html_() and "run-a" in run._repr_html_()


def test_a_failed_run_details_its_failure_and_has_no_eta():
    run = run_from_resource(resource(phase="Failed", progress={"percent": 10, "etaSeconds": 99}, conditions=[
        {"type": "Failed", "status": "True", "reason": "DataValidationFailed", "message": "line 3: no prompt"}]), NOW)
    assert run.status is RunStatus.FAILED and run.details == "DataValidationFailed: line 3: no prompt"
    assert run.estimated_end_time is None and run.formatted_eta is None


def test_a_run_the_operator_will_reject_still_reads():
    body = resource(phase="Failed")
    body["spec"]["contextLength"] = 10 ** 7  # past the CRD's bound; a run object is still made
    run = run_from_resource(body, NOW)
    assert run.context_length == 10 ** 7 and run.submitted_config is None


# --- create() arguments ------------------------------------------------------------------------

ARGS = {"model": "meta-llama/Llama-3.2-1B-Instruct", "train_data_path": "/data/train.jsonl",
        "register_to": "main.ml", "experiment_path": "", "task_type": "INSTRUCTION_FINETUNE",
        "eval_data_path": None, "eval_prompts": None, "custom_weights_path": None,
        "training_duration": None, "learning_rate": None, "context_length": None,
        "validate_inputs": True, "data_prep_cluster_id": None}


def build(**changes):
    extra = changes.pop("extra_spec", None)
    return build_resource({**ARGS, **changes}, name="run-a", namespace="team", owner="ada",
                          labels={"team": "nlp"}, extra_spec=extra)


def test_create_arguments_become_a_spec_the_api_accepts():
    body = build(training_duration="2ep", learning_rate=1e-4, eval_prompts=["Hi"],
                 extra_spec={"resources": {"nodes": 2, "gpusPerNode": 8}})
    assert body["spec"] == {"model": ARGS["model"], "trainDataPath": "/data/train.jsonl", "registerTo": "main.ml",
                            "taskType": "INSTRUCTION_FINETUNE", "evalPrompts": ["Hi"], "trainingDuration": "2ep",
                            "learningRate": 1e-4, "validateInputs": True,
                            "resources": {"nodes": 2, "gpusPerNode": 8}}
    assert body["metadata"] == {"name": "run-a", "namespace": "team", "labels": {"team": "nlp"},
                                "annotations": {"kubetune.dev/owner": "ada"}}
    parse_training_run(body)


@pytest.mark.parametrize("changes, words", [
    ({"register_to": "nodots"}, ["register_to (spec.registerTo)", "<catalog>.<schema>"]),
    ({"training_duration": "10 minutes"}, ["training_duration (spec.trainingDuration)"]),
    ({"task_type": "SUMMARIZE"}, ["task_type (spec.taskType)"]),
    ({"learning_rate": -1.0}, ["learning_rate (spec.learningRate)"]),
    ({"learning_rate": "5e-7"}, ["learning_rate (spec.learningRate)", "valid number"]),
    ({"custom_weights_path": "/ckpt/model.safetensors"}, ["custom_weights_path", "Composer checkpoint"]),
    ({"extra_spec": {"resources": {"nodes": 0}}}, ["spec.resources.nodes"]),
    ({"extra_spec": {"nonsense": 1}}, ["spec.nonsense", "unknown field"]),
    ({"extra_spec": {"learningRate": 0.1}, "learning_rate": 0.2}, ["repeats an argument"]),
])
def test_bad_arguments_raise_invalid_arguments_naming_the_argument(changes, words):
    with pytest.raises(fm.InvalidArgumentsError) as raised:
        build(**changes)
    assert all(word in str(raised.value) for word in words), str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_values_are_sent_as_the_api_parsed_them():
    body = build(learning_rate=5e-7, context_length=128, task_type="CHAT_COMPLETION",
                 train_data_path="/data/chat.jsonl", extra_spec={"resources": {"cpu": 4}})
    assert body["spec"]["learningRate"] == 5e-7 and body["spec"]["contextLength"] == 128
    assert body["spec"]["taskType"] == "CHAT_COMPLETION" and body["spec"]["resources"] == {"cpu": "4"}


def test_a_bad_name_is_refused_with_the_rule():
    with pytest.raises(fm.InvalidArgumentsError, match="metadata.name"):
        build_resource(ARGS, name="Bad_Name", namespace="team", owner=None, labels=None, extra_spec=None)


def test_data_prep_cluster_id_is_accepted_with_a_warning_that_says_what_to_do_instead():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        body = build(data_prep_cluster_id="0101-abc")
    assert "dataPrep" not in body["spec"] and "dataPrepClusterId" not in body["spec"]
    assert any("data_prep_cluster_id is ignored" in str(w.message) and "dataPrep" in str(w.message)
               for w in caught)


def test_generated_run_names_follow_the_name_rules():
    for model in ["meta-llama/Llama-3.1-405B-Instruct", "/models/7B_local", "Qwen/Qwen2.5-0.5B", "x" * 200, "42"]:
        name = run_name(model)
        build_resource(ARGS, name=name, namespace="team", owner=None, labels=None, extra_spec=None)
    assert run_name("meta-llama/Llama-3.1-8B-Instruct").startswith("llama-3-1-8b-instruct-")
    assert run_name("m") != run_name("m")


# --- list filters ------------------------------------------------------------------------------

def runs_at(*specs):
    out = []
    for name, phase, minutes, owner, experiment in specs:
        body = resource(name=name, phase=phase, mlflow={"experimentId": experiment})
        body["metadata"]["creationTimestamp"] = (NOW - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
        body["metadata"]["annotations"] = {"kubetune.dev/owner": owner}
        out.append(run_from_resource(body, NOW))
    return out


RUNS = runs_at(("old", "Succeeded", 30, "ada", "1"), ("mid", "Training", 20, "bob", "1"),
               ("new", "Failed", 10, "ada", "2"))


@pytest.mark.parametrize("arguments, names", [
    ({}, ["new", "mid", "old"]),
    ({"statuses": ["COMPLETED", "FAILED"]}, ["new", "old"]),
    ({"statuses": [RunStatus.RUNNING]}, ["mid"]),
    ({"user_emails": ["ada"]}, ["new", "old"]),
    ({"experiment_id": "1"}, ["mid", "old"]),
    ({"training_runs": ["old", "new"]}, ["new", "old"]),
    ({"limit": 2}, ["new", "mid"]),
    ({"after": NOW - timedelta(minutes=20)}, ["new", "mid"]),
    ({"before": (NOW - timedelta(minutes=20)).isoformat()}, ["old"]),
])
def test_list_filters_and_orders_newest_first(arguments, names):
    assert [r.name for r in select(RUNS, Filters.from_arguments(**arguments))] == names


@pytest.mark.parametrize("arguments, words", [
    ({"statuses": ["DONE"]}, ["unknown status 'DONE'", "COMPLETED"]),
    ({"before": "yesterday"}, ["before must be", "ISO 8601"]),
    ({"limit": 0}, ["limit must be a positive integer"]),
])
def test_bad_list_arguments_raise_invalid_arguments(arguments, words):
    with pytest.raises(fm.InvalidArgumentsError) as raised:
        Filters.from_arguments(**arguments)
    assert all(w in str(raised.value) for w in words)


def test_a_moment_without_zone_is_local_time():
    assert parse_moment(datetime(2026, 1, 1, 12), "after") == datetime(2026, 1, 1, 12).astimezone().astimezone(timezone.utc)


# --- checkpoints -------------------------------------------------------------------------------

def test_checkpoints_come_from_the_operators_own_checkpoint_events():
    """Tied to reconcile.status: the events the operator derives name the paths read back here."""
    old, entries = {}, []
    for path in ["/mnt/kubetune/team/run-a/checkpoints/ep0-ba5-rank0.pt",
                 "/mnt/kubetune/team/run-a/checkpoints/ep1-ba10-rank0.pt"]:
        new = {**old, "phase": "Training", "latestCheckpoint": path}
        events = derive_events(old, new, {}, NOW)
        assert [e.type for e in events if e.type is EventType.CHECKPOINT_SAVED]
        entries = event_entries(entries, events, 50)
        old = new
    body = resource(phase="Training", latestCheckpoint=old["latestCheckpoint"], events=entries)
    paths = checkpoints_of(body)
    assert paths == ["/mnt/kubetune/team/run-a/checkpoints/ep0-ba5-rank0.pt",
                     "/mnt/kubetune/team/run-a/checkpoints/ep1-ba10-rank0.pt"]
    for path in paths:  # each one is a customWeightsPath the API takes as it is
        build(custom_weights_path=path)


def test_the_latest_checkpoint_counts_even_when_its_event_aged_out():
    body = resource(phase="Training", latestCheckpoint="s3://bucket/team/run-a/checkpoints/ep3-ba40-rank0.pt")
    assert checkpoints_of(body) == ["s3://bucket/team/run-a/checkpoints/ep3-ba40-rank0.pt"]
    assert checkpoints_of(resource()) == []


# --- following ---------------------------------------------------------------------------------

def event(kind: str, second: int, message: str = "") -> dict:
    return {"type": kind, "time": f"2026-01-02T03:00:{second:02d}Z", "message": message or kind.lower()}


def test_follow_shows_each_event_once_with_progress_and_ends_at_the_terminal_event():
    created, started = event("CREATED", 1), event("TRAIN_STARTED", 2)
    changes = iter([
        ("ADDED", resource(phase="Pending", events=[created])),
        ("MODIFIED", resource(phase="Training", events=[created, started],
                              progress={"percent": 50, "tokensPerSecond": 900, "loss": 1.25, "etaSeconds": 30})),
        ("MODIFIED", resource(phase="Succeeded", events=[created, started, event("COMPLETED", 9, "run completed")])),
        ("MODIFIED", resource(phase="Succeeded")),  # never read: the run had ended
    ])
    out = io.StringIO()
    ended = follow(changes, TerminalDisplay(out))
    text = out.getvalue()
    assert ended.status is RunStatus.COMPLETED
    assert text.count("CREATED") == 1 and text.count("TRAIN_STARTED") == 1 and "COMPLETED" in text
    assert "50.0%  900 tok/s  loss 1.250  ETA 30s" in text
    assert text.rstrip().endswith("run-a: COMPLETED: run completed")
    assert next(changes)[1]["status"]["phase"] == "Succeeded"  # the fourth change was left unread


def test_follow_of_a_run_deleted_midway_raises_run_not_found():
    changes = [("ADDED", resource(phase="Training")), ("DELETED", resource(phase="Training"))]
    with pytest.raises(fm.RunNotFoundError, match="deleted before it ended"):
        follow(changes, TerminalDisplay(io.StringIO()))


def test_progress_text_shows_unknowns_as_dashes():
    from kubetune.api import Progress

    assert progress_text(None, width=10) == "[..........]   0.0%  - tok/s  loss -  ETA -"
    assert progress_text(Progress(percent=100, tokens_per_second=10, loss=0.5, eta_seconds=0), width=4) == \
        "[####] 100.0%  10 tok/s  loss 0.500  ETA 0s"


def test_the_notebook_view_holds_the_bar_and_the_events():
    run = run_from_resource(resource(phase="Training", progress={"percent": 25}, events=[event("CREATED", 1)]), NOW)
    page = notebook_html(run)
    assert "<progress max='100' value='25.0'" in page and "CREATED" in page and "RUNNING" in page


def test_get_models_lists_the_catalog_with_context_lengths():
    models = fm.get_models()
    by_name = {m.name: m for m in models}
    assert by_name["meta-llama/Llama-3.1-8B-Instruct"].max_context_length == 131072
    assert by_name["meta-llama/Llama-3.1-8B-Instruct"].display_name == "Llama 3.1 8B Instruct"
    assert "Maximum Context Length" in models._repr_html_()
    frame = models.to_pandas()
    assert list(frame.columns) == ["Model Name", "Input Name", "Maximum Context Length"] and len(frame) == len(models)
