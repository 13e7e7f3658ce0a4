"""The generated TrainingRun CRD: fresh, structural, and rejecting what the API rejects.

`admit()` plays the API server's part for one object: prune nulls of non-nullable fields, apply
defaults, validate against the openAPIV3Schema (jsonschema, with strict field validation as
kubectl asks for it) and evaluate every CEL rule with cel-python, transition rules against the
old object. The tables in crd_cases/ run through `admit()` and through `kubetune.api`.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune import api, crdgen

CASES = Path(__file__).parent / "crd_cases"
CRD = yaml.safe_load(crdgen.CRD_PATH.read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
MISSING = object()


# --- A small API server: pruning, defaulting, schema, CEL ---------------------------------


def _is_nullable_null(schema: dict[str, Any], value: Any) -> bool:
    return value is None and not schema.get("nullable", False)


def prune_nulls(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        return {
            key: prune_nulls(props.get(key, {}), item)
            for key, item in value.items()
            if not (key in props and _is_nullable_null(props[key], item))
        }
    if isinstance(value, list) and "items" in schema:
        return [prune_nulls(schema["items"], item) for item in value]
    return value


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for key, prop in schema["properties"].items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                value[key] = apply_defaults(prop, value[key])
        return value
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _type_with_nullable(validator: Any, types: Any, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if instance is None and schema.get("nullable"):
        return
    yield from jsonschema.Draft4Validator.VALIDATORS["type"](validator, types, instance, schema)


def _int_or_string(validator: Any, enabled: Any, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if enabled and (isinstance(instance, bool) or not isinstance(instance, (int, str))):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


# OpenAPI v3.0 is JSON Schema draft 4 (boolean exclusive bounds) plus these extensions.
OpenApiValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"type": _type_with_nullable, "x-kubernetes-int-or-string": _int_or_string}
)


def _path(parts: Any) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")


def schema_errors(obj: dict[str, Any]) -> list[str]:
    return [f"{_path(error.absolute_path)}: {error.message}" for error in OpenApiValidator(SCHEMA).iter_errors(obj)]


def unknown_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """kubectl's default strict field validation: unknown fields are errors, not pruned silently."""
    errors = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if key not in schema["properties"]:
                errors.append(f"unknown field {child}")
            else:
                errors += unknown_fields(schema["properties"][key], item, child)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += unknown_fields(schema["items"], item, f"{path}[{index}]")
    return errors


@functools.cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _holds(rule: str, new: Any, old: Any) -> bool:
    activation = {"self": celpy.json_to_cel(new)}
    if old is not MISSING:
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        return bool(_program(rule).evaluate(activation))
    except celpy.CELEvalError:  # the API server reports an evaluation error as invalid too
        return False


def cel_errors(schema: dict[str, Any], new: Any, old: Any = MISSING, path: str = "") -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"] and old is MISSING:
            continue  # transition rules run on updates only, when the old value exists
        if not _holds(rule["rule"], new, old):
            where = path + rule.get("fieldPath", "")
            errors.append(f"{where}: {rule['message']}" if where else rule["message"])
    if isinstance(new, dict) and "properties" in schema:
        for key, item in new.items():
            if key in schema["properties"]:
                old_item = old.get(key, MISSING) if isinstance(old, dict) else MISSING
                errors += cel_errors(schema["properties"][key], item, old_item, f"{path}.{key}" if path else key)
    elif isinstance(new, list) and "items" in schema:
        for index, item in enumerate(new):  # atomic lists: items have no oldSelf
            errors += cel_errors(schema["items"], item, MISSING, f"{path}[{index}]")
    return errors


def _stored(obj: dict[str, Any]) -> dict[str, Any]:
    return apply_defaults(SCHEMA, prune_nulls(SCHEMA, obj))


def admit(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """The API server's complaints about creating `obj` (or updating `old` to it); [] admits."""
    new = _stored(obj)
    errors = unknown_fields(SCHEMA, new) + schema_errors(new)
    return errors or cel_errors(SCHEMA, new, _stored(old) if old is not None else MISSING)


# --- The case tables ----------------------------------------------------------------------


def _resource(case: dict[str, Any], spec_key: str = "spec") -> dict[str, Any]:
    obj = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": case.get("metadata", {"name": "run", "namespace": "ml"}),
        "spec": case[spec_key],
    }
    return obj | ({"status": case["status"]} if "status" in case else {})


def _load(name: str) -> list[Any]:
    cases = yaml.safe_load((CASES / name).read_text())
    return [pytest.param(case, id=case["name"]) for case in cases]


def _api_problem(obj: dict[str, Any]) -> str | None:
    try:
        api.parse_training_run(obj)
    except api.SpecError as error:
        return str(error)
    return None


@pytest.mark.parametrize("case", _load("valid.yaml"))
def test_valid_objects_are_admitted_by_crd_and_api(case: dict[str, Any]) -> None:
    obj = _resource(case)
    assert admit(obj) == []
    assert _api_problem(obj) is None


@pytest.mark.parametrize("case", _load("invalid.yaml"))
def test_invalid_objects_are_rejected_for_the_expected_reason(case: dict[str, Any]) -> None:
    obj = _resource(case)
    crd_errors, api_problem = admit(obj), _api_problem(obj)
    if "crdError" in case:
        assert any(case["crdError"] in error for error in crd_errors), crd_errors
    else:
        assert crd_errors == [], case.get("why")
    if "apiError" in case:
        assert api_problem is not None and case["apiError"] in api_problem, api_problem
    else:
        assert api_problem is None


@pytest.mark.parametrize("case", _load("transitions.yaml"))
def test_updates_respect_immutability(case: dict[str, Any]) -> None:
    new, old = _resource(case), _resource(case, "old")
    assert admit(old) == []
    errors = admit(new, old)
    if "crdError" in case:
        assert any(case["crdError"] in error for error in errors), errors
        assert len(errors) == 1, errors
    else:
        assert errors == []
    assert _api_problem(new) is None


# --- The CRD itself -----------------------------------------------------------------------


def test_committed_crd_is_generated_from_the_models() -> None:
    assert crdgen.CRD_PATH.read_text() == crdgen.render(), "run `python -m kubetune.crdgen`"


def test_check_mode_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "crd.yaml"
    assert crdgen.main(["--output", str(target)]) == 0
    assert crdgen.main(["--check", "--output", str(target)]) == 0
    target.write_text(target.read_text().replace("shortNames:\n    - tr", "shortNames:\n    - trun"))
    assert crdgen.main(["--check", "--output", str(target)]) == 1
    assert "is stale" in capsys.readouterr().err


def test_crd_is_a_valid_kubernetes_1_35_object() -> None:
    kubernetes_validate.validate(CRD, "1.35.0", strict=True)


def _nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for key, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _nodes(schema[key], f"{path}[{key}]")


FORBIDDEN_IN_STRUCTURAL = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const", "uniqueItems"}


@pytest.mark.parametrize("path,node", list(_nodes(SCHEMA)), ids=lambda v: v if isinstance(v, str) else "")
def test_schema_is_structural(path: str, node: dict[str, Any]) -> None:
    assert not FORBIDDEN_IN_STRUCTURAL & node.keys()
    untyped = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    assert "type" in node or untyped, "every node names its type"
    assert not ("properties" in node and "additionalProperties" in node)
    if node.get("type") == "array":
        assert "items" in node and "maxItems" in node  # bounded, so CEL cost estimates stay finite
    if "default" in node:  # the API server rejects a CRD whose defaults fail their own schema
        assert OpenApiValidator(node).is_valid(node["default"])


@pytest.mark.parametrize("path,node", [(p, n) for p, n in _nodes(SCHEMA["properties"]["spec"], "spec") if n.get("type") == "string"])
def test_spec_strings_are_bounded(path: str, node: dict[str, Any]) -> None:
    assert "maxLength" in node or "enum" in node


def _rules() -> Iterator[Any]:
    for path, node in _nodes(SCHEMA):
        for rule in node.get("x-kubernetes-validations", []):
            yield pytest.param(rule, id=f"{path}: {rule['rule'][:40]}")


@pytest.mark.parametrize("rule", list(_rules()))
def test_every_cel_rule_compiles_and_has_a_message(rule: dict[str, str]) -> None:
    assert _program(rule["rule"]) is not None
    assert rule["message"]
    if "fieldPath" in rule:
        assert re.fullmatch(r"(\.[A-Za-z]+)+", rule["fieldPath"])


def test_immutable_fields_are_guarded_by_transition_rules_and_knobs_are_not() -> None:
    spec = SCHEMA["properties"]["spec"]["properties"]
    guarded = {name for name, node in spec.items() if any("oldSelf" in r["rule"] for r in node.get("x-kubernetes-validations", []))}
    assert guarded == {"model", "trainDataPath", "taskType", "registerTo"}


def test_names_columns_and_subresources() -> None:
    names = CRD["spec"]["names"]
    assert CRD["metadata"]["name"] == "trainingruns.kubetune.dev"
    assert (names["kind"], names["plural"], names["shortNames"]) == ("TrainingRun", "trainingruns", ["tr"])
    assert "kubetune" in names["categories"]
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION["subresources"] == {"status": {}}
    assert VERSION["served"] and VERSION["storage"]
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"] if c.get("priority", 0) == 0}
    assert [(n, c["jsonPath"]) for n, c in columns.items()] == [
        ("Model", ".spec.model"),
        ("Phase", ".status.phase"),
        ("Progress", ".status.progress.percent"),
        ("Age", ".metadata.creationTimestamp"),
    ]


def test_status_phases_and_events_are_typed_enums() -> None:
    status = SCHEMA["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == [phase.value for phase in api.Phase]
    assert status["events"]["items"]["properties"]["type"]["enum"] == [t.value for t in api.EventType]
    assert status["events"]["maxItems"] == api.MAX_EVENTS


def test_defaults_match_the_models() -> None:
    stored = _stored(_resource({"spec": {"model": "m", "trainDataPath": "/d", "registerTo": "c.s"}}))
    parsed = api.parse_training_run(stored).spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    defaults = api.TrainingRunSpec(model="m", train_data_path="/d", register_to="c.s")
    assert parsed == defaults.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert stored["spec"]["resources"]["nodes"] == 1 and stored["spec"]["trainingDuration"] == "1ep"


# --- The CRD and the API agree on the cross-field rules -----------------------------------

PATHS = ["/d/train.jsonl", "/d/folder", "s3://b/p/", "org/ds/train", "/d/x.csv", "/d/x.txt", "/d/x.JSONL", "/d/x.json"]


@settings(max_examples=150, deadline=None)
@given(
    nodes=st.integers(1, 4),
    gpus=st.integers(0, 8),
    procs=st.none() | st.integers(1, 8),
    batch=st.integers(1, 64),
    task=st.sampled_from([t.value for t in api.TaskType]),
    train=st.sampled_from(PATHS),
    evaluation=st.none() | st.sampled_from(PATHS),
    pvc=st.booleans(),
    uri=st.booleans(),
)
def test_crd_and_api_agree(nodes, gpus, procs, batch, task, train, evaluation, pvc, uri) -> None:
    resources = {"nodes": nodes, "gpusPerNode": gpus} | ({"processesPerNode": procs} if procs else {})
    storage = ({"pvc": {"claimName": "c"}} if pvc else {}) | ({"uri": "s3://b"} if uri else {})
    spec = {"model": "m", "trainDataPath": train, "registerTo": "c.s", "taskType": task, "globalBatchSize": batch,
            "resources": resources, "storage": storage} | ({"evalDataPath": evaluation} if evaluation else {})
    obj = _resource({"spec": spec})
    assert (admit(obj) == []) == (_api_problem(obj) is None)
