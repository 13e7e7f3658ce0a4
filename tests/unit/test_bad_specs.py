"""Bad TrainingRuns: the corpus in crd_cases/ judged alike by the CRD, `kubetune validate` and
`kubetune run --local`, messages that name the field and the rule, and a fuzz test that nothing
but the documented errors comes out of the validators.

The CRD side is `admit()` of test_crd.py (schema + CEL in cel-python); the e2e twin,
tests/e2e/test_bad_input.py, sends the same corpus to the real API server and operator.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune import api, cli
from tests.unit.test_crd import CASES, _api_problem, _resource, admit

INVALID = yaml.safe_load((CASES / "invalid.yaml").read_text())
VALID = yaml.safe_load((CASES / "valid.yaml").read_text())
SPEC_CASES = [case for case in INVALID if "status" not in case]  # what a person writes
BASE = {"model": "m", "trainDataPath": "/d/x.jsonl", "registerTo": "c.s"}


def document(case: dict[str, Any]) -> dict[str, Any]:
    return _resource(case)


def field_of(case: dict[str, Any]) -> str:
    """The field the API names first, e.g. `spec.resources.nodes`."""
    return case["apiError"].split(":")[0]


def write(tmp_path: Path, obj: Any, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return str(path)


# --- One verdict, wherever the spec is judged -------------------------------------------------


def test_the_corpus_holds_at_least_40_refused_specs_each_naming_its_field() -> None:
    assert len(SPEC_CASES) >= 40
    assert all("apiError" in case and ":" in case["apiError"] for case in SPEC_CASES)
    assert len({case["name"] for case in INVALID}) == len(INVALID)


def _leaves(schema: dict[str, Any], path: str):
    if "properties" in schema:
        for key, child in schema["properties"].items():
            yield from _leaves(child, f"{path}.{key}")
    elif "properties" in schema.get("items", {}):
        yield from _leaves(schema["items"], f"{path}[]")
    else:
        yield path


def test_every_spec_field_has_a_refused_case_naming_it() -> None:
    from tests.unit.test_crd import SCHEMA

    named = {re.sub(r"\[\d+\]", "[]", field_of(case)) for case in SPEC_CASES}
    named |= {name.rsplit(".", 1)[0] for name in named}  # a map's key names the map
    assert [leaf for leaf in _leaves(SCHEMA["properties"]["spec"], "spec") if leaf not in named] == []


@pytest.mark.parametrize("case", INVALID + VALID, ids=lambda case: case["name"])
def test_crd_and_local_parser_give_the_same_verdict(case: dict[str, Any]) -> None:
    obj = document(case)
    crd_admits, api_accepts = admit(obj) == [], _api_problem(obj) is None
    if "why" in case:  # a deliberate difference: only the operator's catalog knows the rule
        assert crd_admits and not api_accepts, case["why"]
    else:
        assert crd_admits == api_accepts, (admit(obj), _api_problem(obj))


def test_the_only_deliberate_differences_are_the_catalog_rules() -> None:
    assert [case["name"] for case in INVALID if "why" in case] == ["context length above the model max"]


@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda case: case["name"])
def test_kubetune_validate_refuses_each_case_naming_field_and_rule(case, tmp_path, capsys) -> None:
    assert cli.main(["validate", write(tmp_path, document(case))]) == 1
    err = capsys.readouterr().err
    assert f"{case['apiError']}" in err, err
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda case: case["name"])
def test_run_local_refuses_each_case_as_validate_does(case, tmp_path, capsys) -> None:
    path = write(tmp_path, document(case))
    assert cli.main(["run", path, "--local", "--workdir", str(tmp_path / "work")]) == 1
    err = capsys.readouterr().err
    assert case["apiError"] in err and "Traceback" not in err
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # nothing started


def test_local_mode_judges_the_paths_as_written_not_as_resolved(tmp_path, capsys) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    spec = BASE | {"trainDataPath": f"{tmp_path}/other/../d/x.jsonl"}
    assert cli.main(["validate", write(tmp_path, document({"spec": spec}))]) == 1
    assert "spec.trainDataPath: must not contain '..' segments" in capsys.readouterr().err


@pytest.mark.parametrize("text,value", [("1e-5", 1e-5), ("2E-4", 2e-4), ("1.0e-5", 1e-5), ("'1e-5'", "1e-5")])
def test_run_files_are_read_as_kubectl_reads_them(text, value, tmp_path) -> None:
    path = write(tmp_path, f"kind: TrainingRun\nspec: {{learningRate: {text}}}\n")
    assert cli.load_document(path)["spec"]["learningRate"] == value


# --- Messages found by trying it as a new user would ----------------------------------------


def test_a_binary_file_is_not_utf8_text(tmp_path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(b"kind: TrainingRun\n\xff\xfe\x00\x89PNG")
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "run.yaml: not UTF-8 text (byte 18 is 0xff)" in err and "internal error" not in err


def test_a_file_larger_than_any_trainingrun_is_refused_unread(tmp_path, capsys) -> None:
    path = tmp_path / "run.yaml"
    with open(path, "wb") as out:
        out.truncate(cli.MAX_RUN_FILE_BYTES + 1)  # sparse: nothing is written, nothing read
    assert cli.main(["validate", str(path)]) == 1
    assert f"{cli.MAX_RUN_FILE_BYTES + 1} bytes, larger than a TrainingRun can be" in capsys.readouterr().err


@pytest.mark.parametrize("text,found", [
    ("", "found 0: the file is empty"),
    ("apiVersion: v1\nkind: Secret\n---\n- a list\n", "found 0: 2 documents: kind Secret, a list"),
    ("metadata: {name: x}\nspec: {}\n", "found 0: 1 document: a mapping without `kind`"),
    ("kind: TrainingRun\n---\nkind: TrainingRun\n", "found 2: 2 documents: kind TrainingRun, kind TrainingRun"),
])
def test_a_file_without_one_trainingrun_says_what_it_holds(text, found, tmp_path, capsys) -> None:
    assert cli.main(["validate", write(tmp_path, text)]) == 1
    err = capsys.readouterr().err
    assert found in err and "kind: TrainingRun" in err


@pytest.mark.parametrize("text", ["kind: TrainingRun\nmetadata: {name: r}\n",
                                  "kind: TrainingRun\nmetadata: {name: r}\nspec:\n"])
def test_a_missing_spec_is_named_without_python_class_names(text, tmp_path, capsys) -> None:
    assert cli.main(["validate", write(tmp_path, "apiVersion: kubetune.dev/v1alpha1\n" + text)]) == 1
    err = capsys.readouterr().err
    assert "spec: required field is missing" in err
    assert "TrainingRunSpec" not in err and "dictionary" not in err


def test_a_long_name_gives_the_real_limit_once(tmp_path, capsys) -> None:
    obj = document({"metadata": {"name": "a" * 300}, "spec": BASE})
    assert cli.main(["validate", write(tmp_path, obj)]) == 1
    err = capsys.readouterr().err
    assert "at most 48 characters" in err and "253" not in err and "(300 characters)" in err
    assert len(err) < 600


def test_the_operator_without_a_kubeconfig_says_so(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["operator"]) == 1
    err = capsys.readouterr().err
    assert "operator: no Kubernetes API to talk to" in err and "set KUBECONFIG" in err
    assert "internal error" not in err


def test_the_printout_of_a_finished_local_run_names_the_registered_version(tmp_path, capsys) -> None:
    class Finished:  # what report_outcome reads of a LocalRun
        folder = tmp_path
        settings = type("S", (), {"mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})()

        def config(self):
            return None

    status = {"registeredModel": {"name": "main.ml.ft", "version": "3", "artifactUri": "/w/hf"}}
    assert cli.report_outcome({"status": status}, "Succeeded", Finished()) == 0
    out = capsys.readouterr().out
    assert "models:/main.ml.ft/3" in out and "artifact URI" not in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out
    assert cli.mlflow_ui_hint("http://mlflow:5000") == "http://mlflow:5000"


# --- Fuzz: random specs and files give the documented errors only ----------------------------

SPEC_FIELDS = list(api.TrainingRunSpec.model_json_schema(by_alias=True)["properties"])
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                | st.text(max_size=30) | st.sampled_from(["1ep", "c.s", "/d/x.jsonl", "..", "s3://b/k", "16Gi"]))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(SPEC_FIELDS) | st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.dictionaries(st.sampled_from(SPEC_FIELDS), JSON, max_size=8), base=st.booleans(),
       name=st.text(string.ascii_lowercase + "-.A0_", max_size=60))
def test_random_specs_raise_spec_error_or_parse(spec, base, name) -> None:
    body = document({"metadata": {"name": name}, "spec": (BASE | spec) if base else spec})
    try:
        api.parse_training_run(body)
    except api.SpecError as error:
        assert error.problems and all(p.field and p.message for p in error.problems)


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(SPEC_FIELDS), value=JSON)
def test_one_field_of_any_value_is_judged_as_the_crd_judges_it(field, value) -> None:
    obj = document({"spec": BASE | {field: value}})
    if field == "contextLength" or "model" == field:
        return  # the operator's model catalog knows more than the CRD (the corpus's `why` case)
    assert (admit(obj) == []) == (_api_problem(obj) is None), (admit(obj), _api_problem(obj))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_random_run_files_give_a_clear_line_not_a_traceback(data, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "run.yaml"
    path.write_bytes(b"apiVersion: kubetune.dev/v1alpha1\nkind: TrainingRun\n" + data)
    try:
        cli.parse_or_explain(cli.load_document(str(path)), str(path))
    except cli.CliError as error:
        assert str(error).startswith(str(path)) and "Traceback" not in str(error)


# --- What only a look at the inputs can tell: the pre-flight of `kubetune validate` ------------


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    # fsspec keeps one S3 filesystem per set of options for the process: an earlier test's, with
    # its moto credentials, would answer instead of a credential-less one.
    import fsspec
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups here
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


@pytest.mark.parametrize("extra,words", [
    ({"model": "/nonexistent/model"}, "ModelNotFound: model /nonexistent/model: no such folder"),
    ({"contextLength": 100000}, "contextLength 100000 exceeds the model's maximum context of 512 tokens"),
    ({"trainDataPath": "s3://kubetune-nowhere/train.jsonl"},
     "MissingCredentials: no object-store credentials for an s3:// path: name a Secret"),
])
def test_the_preflight_refuses_inputs_the_schema_cannot_judge(
        extra, words, tiny_model_dir, no_aws_credentials, tmp_path, capsys) -> None:
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    spec = BASE | {"model": str(tiny_model_dir), "trainDataPath": str(tmp_path / "x.jsonl")} | extra
    assert cli.main(["validate", write(tmp_path, document({"spec": spec}))]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "internal error" not in err


def test_a_pod_without_object_store_credentials_fails_for_good(no_aws_credentials) -> None:
    from botocore.exceptions import NoCredentialsError
    from kubetune_trainer.errors import user_error_of

    error = user_error_of(NoCredentialsError())
    assert error is not None and error.permanent and error.reason == "MissingCredentials"
    assert "spec.secrets.objectStore" in error.message
    assert user_error_of(RuntimeError("a bug")) is None
