"""kubetune.api: parsing TrainingRuns, field-naming errors, defaults and resolved values."""

from __future__ import annotations

import re

import math
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from kubetune import api, durations, models_catalog
from kubetune.api import Phase, SpecError, TaskType, TrainingRunSpec

BASE = {"model": "meta-llama/Llama-3.1-8B-Instruct", "trainDataPath": "/data/train.jsonl", "registerTo": "main.ml"}


def body(spec: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "run", "namespace": "ml", **metadata},
        "spec": BASE | (spec or {}),
    }


def problem(spec: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as caught:
        api.parse_training_run(body(spec))
    return caught.value


# --- Valid specs and defaults -------------------------------------------------------------


def test_minimal_spec_gets_the_documented_defaults() -> None:
    spec = api.parse_training_run(body()).spec
    assert spec.task_type is TaskType.INSTRUCTION_FINETUNE
    assert (spec.training_duration, spec.global_batch_size, spec.backoff_limit) == ("1ep", 16, 3)
    assert spec.learning_rate is None and spec.context_length is None and spec.eval_data_path is None
    assert spec.validate_inputs is True and spec.suspend is False and spec.eval_prompts == []
    assert (spec.resources.nodes, spec.resources.gpus_per_node, spec.resources.processes()) == (1, 0, 1)
    assert spec.resources.gpu_resource_name is None  # the operator's KUBETUNE_GPU_RESOURCE
    assert spec.resources.shared_memory == "8Gi"
    assert spec.image.pull_policy is api.PullPolicy.IF_NOT_PRESENT and spec.image.trainer is None
    assert spec.storage.pvc is None and spec.storage.uri is None
    assert spec.data_prep.parallelism == 1
    assert spec.scheduling.node_selector == {} and spec.scheduling.tolerations == []


@pytest.mark.parametrize(
    "extra",
    [
        {"taskType": "CHAT_COMPLETION", "evalDataPath": "org/chat/test"},
        {"taskType": "CONTINUED_PRETRAIN", "trainDataPath": "s3://bucket/corpus/"},
        {"taskType": "CONTINUED_PRETRAIN", "trainDataPath": "main.corpus.docs"},
        {"trainDataPath": "HuggingFaceH4/ultrachat_200k/train_sft"},
        {"trainDataPath": "/data/v1.2"},
        {"trainingDuration": "1000000tok", "learningRate": 1},
        {"learningRate": 1e-9, "contextLength": 1},
        {"contextLength": 131072},
        {"resources": {"nodes": 2, "gpusPerNode": 8, "cpu": 32, "memory": "1Ti"}, "globalBatchSize": 32},
        {"resources": {"cpu": "0.5"}},
        {"customWeightsPath": "/ckpt/ep1-ba10-rank0.pt"},
        {"customWeightsPath": "s3://b/ckpt/latest-rank0.pt.symlink"},
        {"customWeightsPath": "/ckpt/sharded/"},
        {"storage": {"pvc": {"claimName": "scratch", "subPath": "teams/a"}}},
        {"storage": {"uri": "/mnt/shared"}},
        {"registerTo": "main.ml.llama-ft_v2"},
        {"secrets": {"hfToken": {"name": "hf", "key": "HF_TOKEN"}}},
        {"scheduling": {"tolerations": [{"key": "gpu", "operator": "Exists"}], "queueName": "team-a"}},
    ],
    ids=str,
)
def test_valid_specs_parse(extra: dict[str, Any]) -> None:
    assert api.parse_training_run(body(extra)).spec is not None


def test_quantities_may_be_numbers_as_kubernetes_allows() -> None:
    spec = api.parse_training_run(body({"resources": {"cpu": 4, "memory": "16Gi"}})).spec
    assert spec.resources.cpu == "4"


def test_snake_case_names_populate_too() -> None:
    spec = TrainingRunSpec(model="m", train_data_path="/d", register_to="c.s", resources=api.Resources(gpus_per_node=2))
    assert spec.model_dump(by_alias=True)["resources"]["gpusPerNode"] == 2


def test_models_are_frozen() -> None:
    spec = api.parse_training_run(body()).spec
    with pytest.raises(ValidationError):
        spec.model = "other"  # type: ignore[misc]


def test_dump_and_parse_round_trip() -> None:
    run = api.parse_training_run(body({"evalPrompts": ["hi"], "resources": {"nodes": 2}}))
    again = api.parse_training_run(run.model_dump(by_alias=True, exclude_none=True, mode="json"))
    assert again == run


def test_unknown_metadata_is_ignored_and_kopf_mapping_views_are_accepted() -> None:
    raw = body(resourceVersion="7", managedFields=[{"manager": "kubectl"}], uid="u-1", generation=3)
    run = api.parse_training_run(MappingProxyType(raw | {"spec": MappingProxyType(raw["spec"])}))
    assert (run.metadata.uid, run.metadata.generation, run.metadata.namespace) == ("u-1", 3, "ml")


# --- Invalid specs: every message names the field -----------------------------------------


@pytest.mark.parametrize(
    "extra,field,words",
    [
        ({"registerTo": "x"}, "spec.registerTo", "must be <catalog>.<schema> or <catalog>.<schema>.<name>, got 'x'"),
        ({"registerTo": "a.b.c.d"}, "spec.registerTo", "got 'a.b.c.d'"),
        ({"registerTo": "a..b"}, "spec.registerTo", "must be"),
        ({"trainingDuration": "1.5ep"}, "spec.trainingDuration", "must be <N>ep, <N>tok or <N>ba"),
        ({"trainingDuration": "01ep"}, "spec.trainingDuration", "got '01ep'"),
        ({"trainingDuration": "3 ep"}, "spec.trainingDuration", "must be"),
        ({"learningRate": 0}, "spec.learningRate", "greater than 0"),
        ({"learningRate": -1e-5}, "spec.learningRate", "greater than 0"),
        ({"learningRate": 2}, "spec.learningRate", "less than or equal to 1"),
        ({"learningRate": math.nan}, "spec.learningRate", "finite number"),
        ({"learningRate": math.inf}, "spec.learningRate", "finite number"),
        ({"contextLength": 0}, "spec.contextLength", "greater than or equal to 1"),
        ({"contextLength": 131073}, "spec.contextLength", "less than or equal to 131072"),
        ({"model": "google/gemma-2-9b-it", "contextLength": 16384}, "spec.contextLength", "exceeds the maximum context length of google/gemma-2-9b-it (8192)"),
        ({"model": "GOOGLE/GEMMA-2-9B-IT", "contextLength": 16384}, "spec.contextLength", "8192"),
        ({"taskType": "CONTINUED_PRETRAIN"}, "spec.trainDataPath", "CONTINUED_PRETRAIN reads a folder of .txt files"),
        ({"taskType": "CONTINUED_PRETRAIN", "trainDataPath": "/d/one.txt"}, "spec.trainDataPath", "not a single file"),
        ({"trainDataPath": "/d/train.parquet"}, "spec.trainDataPath", "read JSONL"),
        ({"taskType": "CHAT_COMPLETION", "trainDataPath": "s3://b/chat.csv"}, "spec.trainDataPath", "got 's3://b/chat.csv'"),
        ({"evalDataPath": "/d/eval.txt"}, "spec.evalDataPath", "read JSONL"),
        ({"trainDataPath": "/d/x.jsonl "}, "spec.trainDataPath", "without leading or trailing spaces"),
        ({"model": ""}, "spec.model", "non-empty"),
        ({"storage": {"pvc": {"claimName": "a"}, "uri": "s3://b"}}, "spec.storage", "set either pvc or uri, not both"),
        ({"storage": {"pvc": {"claimName": "Scratch"}}}, "spec.storage.pvc.claimName", "lowercase DNS name"),
        ({"storage": {"pvc": {"claimName": "a", "subPath": "/abs"}}}, "spec.storage.pvc.subPath", "relative path"),
        ({"storage": {"pvc": {"subPath": "a"}}}, "spec.storage.pvc.claimName", "required"),
        ({"storage": {"uri": "no-scheme"}}, "spec.storage.uri", "object-store URI"),
        ({"resources": {"nodes": 0}}, "spec.resources.nodes", "greater than or equal to 1, got 0"),
        ({"resources": {"gpusPerNode": -1}}, "spec.resources.gpusPerNode", "greater than or equal to 0"),
        ({"resources": {"gpusPerNode": 4, "processesPerNode": 8}, "globalBatchSize": 16}, "spec.resources.processesPerNode", "exceed gpusPerNode (4)"),
        ({"resources": {"nodes": 2, "gpusPerNode": 3}}, "spec.globalBatchSize", "16 is not a multiple of the 6 training processes"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory", "Kubernetes quantity"),
        ({"resources": {"cpu": True}}, "spec.resources.cpu", "valid string"),
        ({"resources": {"cpu": 0.5}}, "spec.resources.cpu", "valid string"),  # the CRD takes int-or-string
        ({"evalPrompts": ["fine", ""]}, "spec.evalPrompts[1]", "non-blank prompt"),
        ({"evalPrompts": "one prompt"}, "spec.evalPrompts", "valid list"),
        ({"customWeightsPath": "/hf/pytorch_model.bin"}, "spec.customWeightsPath", "Composer checkpoint"),
        ({"customWeightsPath": "/ckpt/__0_0.distcp"}, "spec.customWeightsPath", "folder of .distcp shards"),
        ({"image": {"pullPolicy": "Sometimes"}}, "spec.image.pullPolicy", "'Always', 'IfNotPresent' or 'Never'"),
        ({"secrets": {"hfToken": {"name": "hf", "key": "a b"}}}, "spec.secrets.hfToken.key", "Secret key"),
        ({"scheduling": {"nodeSelector": {"kubernetes.io/arch": 1}}}, "spec.scheduling.nodeSelector['kubernetes.io/arch']", "valid string"),
        ({"scheduling": {"tolerations": [{"operator": "Maybe"}]}}, "spec.scheduling.tolerations[0].operator", "'Exists' or 'Equal'"),
        ({"backoffLimit": -1}, "spec.backoffLimit", "greater than or equal to 0"),
        ({"activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds", "greater than 0"),
        ({"ttlSecondsAfterFinished": -5}, "spec.ttlSecondsAfterFinished", "greater than or equal to 0"),
        ({"globalBatchSize": 0}, "spec.globalBatchSize", "greater than or equal to 1"),
        ({"dataPrep": {"parallelism": 0}}, "spec.dataPrep.parallelism", "greater than or equal to 1"),
        ({"suspend": "sometimes"}, "spec.suspend", "valid boolean"),
        ({"learning_rate_typo": 1}, "spec.learning_rate_typo", "unknown field"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_invalid_specs_name_the_field(extra: dict[str, Any], field: str, words: str) -> None:
    error = problem(extra)
    assert (error.field, len(error.problems)) == (field, 1), str(error)
    assert words in error.message
    assert str(error) == f"{field}: {error.message}"
    assert "\n" not in str(error)


def test_every_problem_is_one_line() -> None:
    error = problem({"model": " ", "registerTo": "x", "resources": {"nodes": 0}, "bogus": 1})
    lines = str(error).splitlines()
    assert [line.split(":")[0] for line in lines] == ["spec.model", "spec.registerTo", "spec.resources.nodes", "spec.bogus"]
    assert error.reason == "InvalidSpec"


def test_missing_required_fields_and_wrong_kind() -> None:
    with pytest.raises(SpecError) as caught:
        api.parse_training_run({"apiVersion": "kubetune.dev/v1", "kind": "TrainingRun", "metadata": {"name": "r"}, "spec": {}})
    fields = {p.field for p in caught.value.problems}
    assert fields == {"apiVersion", "spec.model", "spec.trainDataPath", "spec.registerTo"}


@pytest.mark.parametrize("name", ["my.run", "Run", "1run", "run-", "r" * 49])
def test_run_names_must_leave_room_for_child_names(name: str) -> None:
    with pytest.raises(SpecError) as caught:
        api.parse_training_run(body(name=name))
    assert caught.value.field == "metadata.name"


def test_parse_spec_prefixes_errors_with_spec() -> None:
    with pytest.raises(SpecError) as caught:
        api.parse_spec(BASE | {"registerTo": "nope"})
    assert caught.value.field == "spec.registerTo"
    assert api.parse_spec(BASE).register_to == "main.ml"


def test_spec_error_can_be_raised_by_other_modules() -> None:
    error = SpecError("spec.trainDataPath", "not found", api.Problem("spec.evalDataPath", "not found"))
    assert str(error) == "spec.trainDataPath: not found\nspec.evalDataPath: not found"
    assert (error.field, error.message) == ("spec.trainDataPath", "not found")


# --- Resolved values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({}, 5e-7),
        ({"model": "meta-llama/Llama-3.1-405B-Instruct"}, 1e-5),
        ({"model": "/models/llama-3.1-405b-instruct"}, 1e-5),
        ({"model": "/models/llama-3.1-4050b"}, 5e-7),
        ({"model": "meta-llama/Llama-3.1-405B", "learningRate": 3e-4}, 3e-4),
    ],
)
def test_resolved_learning_rate(extra: dict[str, Any], expected: float) -> None:
    assert api.parse_training_run(body(extra)).spec.resolved_learning_rate() == expected


@pytest.mark.parametrize(
    "register_to,run_name,expected",
    [
        ("main.ml", "llama-ft", "main.ml.llama-ft"),
        ("main.ml.fixed", "llama-ft", "main.ml.fixed"),
        ("main.ml", "v1.2", "main.ml.v1_2"),
    ],
)
def test_resolved_register_name(register_to: str, run_name: str, expected: str) -> None:
    spec = api.parse_spec(BASE | {"registerTo": register_to})
    assert spec.resolved_register_name(run_name) == expected
    assert len(expected.split(".")) == 3


def test_resolved_experiment_path_and_owner() -> None:
    run = api.parse_training_run(body())
    assert run.owner == "ml" and run.experiment_path() == "/Users/ml/run"
    owned = api.parse_training_run(body(annotations={api.OWNER_ANNOTATION: "alice@example.com"}))
    assert owned.experiment_path() == "/Users/alice@example.com/run"
    explicit = api.parse_training_run(body({"experimentPath": "/Shared/exp"}))
    assert explicit.experiment_path() == "/Shared/exp"
    assert explicit.register_name() == "main.ml.run"


@pytest.mark.parametrize(
    "extra,expected",
    [
        ({}, 8192),
        ({"model": "google/gemma-2-2b"}, 8192),
        ({"model": "Qwen/Qwen2.5-7B-Instruct"}, 8192),
        ({"model": "/models/tiny"}, None),
        ({"model": "/models/tiny", "contextLength": 512}, 512),
    ],
)
def test_resolved_context_length(extra: dict[str, Any], expected: int | None) -> None:
    assert api.parse_training_run(body(extra)).spec.resolved_context_length() == expected


def test_world_size() -> None:
    assert api.Resources(nodes=2, gpus_per_node=8).world_size() == 16
    assert api.Resources(nodes=3, gpus_per_node=8, processes_per_node=2).world_size() == 6
    assert api.Resources(nodes=2).world_size() == 2


# --- Status -------------------------------------------------------------------------------


def test_status_parses_and_tolerates_other_writers() -> None:
    now = datetime(2025, 5, 1, 10, tzinfo=timezone.utc)
    status = {
        "phase": "Training",
        "kopf": {"progress": {}},
        "conditions": [{"type": "Ready", "status": "False", "reason": "Training", "lastTransitionTime": now.isoformat()}],
        "progress": {"percent": 10, "loss": math.nan, "tokensPerSecond": 5.0},
        "registeredModel": {"name": "main.ml.run", "version": 3},
        "events": [{"type": "CREATED", "time": now.isoformat()}],
    }
    parsed = api.parse_training_run(body() | {"status": status}).status
    assert parsed is not None and parsed.phase is Phase.TRAINING
    assert parsed.progress is not None and parsed.progress.loss is None  # NaN cannot travel in JSON
    assert parsed.registered_model is not None and parsed.registered_model.version == "3"
    assert parsed.conditions[0].last_transition_time == now
    dumped = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert dumped["events"] == [{"type": "CREATED", "time": "2025-05-01T10:00:00Z", "message": ""}]


def test_status_events_are_bounded() -> None:
    event = {"type": "TRAIN_UPDATED", "time": "2025-05-01T10:00:00Z"}
    api.TrainingRunStatus.model_validate({"events": [event] * api.MAX_EVENTS})
    with pytest.raises(ValidationError):
        api.TrainingRunStatus.model_validate({"events": [event] * (api.MAX_EVENTS + 1)})


def test_phases_and_events() -> None:
    assert api.TERMINAL == {Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED}
    assert [p.value for p in Phase] == [
        "Pending", "Queued", "PreparingData", "Training", "Registering", "Succeeded", "Failed", "Cancelled", "Suspended",
    ]
    assert {e.value for e in api.EventType} >= {"CREATED", "REGISTERED", "COMPLETED", "FAILED", "STOPPED"}
    assert len(api.EventType) == 14  # and RESUMED_FROM_CHECKPOINT, CHECKPOINT_FALLBACK


def test_constants() -> None:
    assert (api.GROUP, api.VERSION, api.KIND, api.PLURAL, api.SHORT_NAME) == (
        "kubetune.dev", "v1alpha1", "TrainingRun", "trainingruns", "tr",
    )
    assert api.API_VERSION == "kubetune.dev/v1alpha1"


# --- Durations and the model catalog ------------------------------------------------------


@given(value=st.integers(1, 10**12), unit=st.sampled_from(["ep", "tok", "ba"]))
def test_durations_are_accepted(value: int, unit: str) -> None:
    text = f"{value}{unit}"
    assert re.fullmatch(durations.DURATION_PATTERN, text)
    assert api.parse_spec(BASE | {"trainingDuration": text}).training_duration == text


@pytest.mark.parametrize("text", ["", "0ep", "01ep", "1.5ep", "1 ep", "ep", "10", "10EP", "10epochs", "-1ba", "1ep\n"])
def test_durations_reject(text: str) -> None:
    assert not re.fullmatch(durations.DURATION_PATTERN, text)
    with pytest.raises(api.SpecError, match="trainingDuration"):
        api.parse_spec(BASE | {"trainingDuration": text})


def test_models_catalog() -> None:
    names = [m.name for m in models_catalog.supported_models()]
    assert len(names) == len(set(names)) >= 10
    assert all(m.max_context_length > 0 and m.parameters > 0 for m in models_catalog.supported_models())
    info = models_catalog.lookup(" meta-llama/llama-3.1-8b-instruct ")
    assert info is not None and info.max_context_length == 131072
    assert models_catalog.lookup("/models/tiny") is None
    assert models_catalog.is_405b("meta-llama/Llama-3.1-405B")
    assert not models_catalog.is_405b("meta-llama/Llama-3.1-70B")


@pytest.mark.parametrize(
    "path,task,ok",
    [
        ("/d/x.jsonl", TaskType.INSTRUCTION_FINETUNE, True),
        ("/d/x.JSON", TaskType.CHAT_COMPLETION, True),
        ("/d/x.Csv", TaskType.CHAT_COMPLETION, False),
        ("/d/corpus", TaskType.CONTINUED_PRETRAIN, True),
        ("/d/corpus.jsonl", TaskType.CONTINUED_PRETRAIN, False),
        ("catalog.schema.table", TaskType.CONTINUED_PRETRAIN, True),
    ],
)
def test_data_path_problem(path: str, task: TaskType, ok: bool) -> None:
    assert (api.data_path_problem(path, task) is None) == ok
