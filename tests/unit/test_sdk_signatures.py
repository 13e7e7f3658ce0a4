"""kubetune.foundation_model against the real databricks-genai wheels, so the two cannot drift.

The wheels (1.1.8, the last; 1.0.0 for `delete`, which 1.1.8 dropped) are fetched with pip once
and cached under ~/.cache/kubetune/databricks-genai-<version>/; their source is read with `ast`,
never imported (it needs mcli, mlflow and a Databricks workspace).
"""

from __future__ import annotations

import ast
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from kubetune import foundation_model as fm

LAST, WITH_DELETE = "1.1.8", "1.0.0"
PACKAGE = "databricks/model_training/api/foundation_model"
TYPES = "databricks/model_training/types"
# Where kubetune knowingly differs (and says so in the docstring): the service's documentation
# names INSTRUCTION_FINETUNE as the default task type; 1.1.8's code said CHAT_COMPLETION.
DOCUMENTED_DIFFERENCES = {("create", "task_type"): ("CHAT_COMPLETION", "INSTRUCTION_FINETUNE")}
KINDS = {"posonly": inspect.Parameter.POSITIONAL_ONLY, "arg": inspect.Parameter.POSITIONAL_OR_KEYWORD,
         "kwonly": inspect.Parameter.KEYWORD_ONLY}


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def wheel(version: str) -> zipfile.ZipFile:
    folder = cache_root() / f"databricks-genai-{version}"
    found = sorted(folder.glob("databricks_genai-*.whl"))
    if not found:
        with tempfile.TemporaryDirectory() as scratch:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", scratch,
                 f"databricks-genai=={version}"], capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"pip could not fetch databricks-genai {version}:\n{result.stderr}"
            folder.mkdir(parents=True, exist_ok=True)
            for path in Path(scratch).glob("*.whl"):
                shutil.move(str(path), folder / path.name)
        found = sorted(folder.glob("databricks_genai-*.whl"))
    return zipfile.ZipFile(found[0])


def module(archive: zipfile.ZipFile, path: str) -> ast.Module:
    return ast.parse(archive.read(path).decode())


def constants(tree: ast.Module) -> dict[str, object]:
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def default_value(node: ast.expr | None, names: dict[str, object]) -> object:
    if node is None:
        return inspect.Parameter.empty
    if isinstance(node, ast.Name):
        return names[node.id]
    return ast.literal_eval(node)


def their_signature(archive: zipfile.ZipFile, function: str) -> list[tuple[str, inspect._ParameterKind, object]]:
    tree = module(archive, f"{PACKAGE}/{function}.py")
    definition = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    args, names = definition.args, constants(tree)
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [(a.arg, KINDS["posonly"] if a in args.posonlyargs else KINDS["arg"], default_value(d, names))
              for a, d in zip(positional, defaults)]
    params += [(a.arg, KINDS["kwonly"], default_value(d, names)) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    assert args.vararg is None and args.kwarg is None, f"{function} takes *args/**kwargs now: compare by hand"
    return params


def public_functions(archive: zipfile.ZipFile) -> list[str]:
    tree = module(archive, f"{PACKAGE}/__init__.py")
    exported = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
    return sorted(ast.literal_eval(exported.value))


def compare(function: str, theirs, ours: inspect.Signature) -> list[str]:
    """What a call written for their function would find different in ours."""
    problems = []
    mine = list(ours.parameters.values())
    for index, (name, kind, default) in enumerate(theirs):
        if index >= len(mine) or mine[index].name != name:
            problems.append(f"{function}: parameter {index} is {name!r} there, "
                            f"{mine[index].name if index < len(mine) else 'missing'!r} here")
            continue
        if mine[index].kind != kind:
            problems.append(f"{function}({name}): {kind.description} there, {mine[index].kind.description} here")
        expected = DOCUMENTED_DIFFERENCES.get((function, name), (default, default))
        if (default, mine[index].default) != expected:
            problems.append(f"{function}({name}): default {default!r} there, {mine[index].default!r} here")
    for extra in mine[len(theirs):]:  # kubetune's additions must not disturb a call written for theirs
        if extra.kind != inspect.Parameter.KEYWORD_ONLY or extra.default is inspect.Parameter.empty:
            problems.append(f"{function}({extra.name}): kubetune's additions must be keyword-only with a default")
    return problems


@pytest.fixture(scope="module")
def last() -> zipfile.ZipFile:
    return wheel(LAST)


def test_every_public_function_of_1_1_8_has_the_same_parameters_order_markers_and_defaults(last):
    functions = public_functions(last)
    assert set(functions) == {"cancel", "create", "get", "get_checkpoints", "get_events", "get_models", "list"}
    problems = [p for name in functions
                for p in compare(name, their_signature(last, name), inspect.signature(getattr(fm, name)))]
    assert not problems, "\n".join(problems)


def test_delete_matches_the_last_sdk_that_had_it():
    archive = wheel(WITH_DELETE)
    assert "delete" in public_functions(archive)
    problems = compare("delete", their_signature(archive, "delete"), inspect.signature(fm.delete))
    assert not problems, "\n".join(problems)


def test_the_documented_differences_are_still_differences(last):
    # If the service's code ever agreed with its docs, the exception above would hide nothing.
    for (function, name), (theirs, ours) in DOCUMENTED_DIFFERENCES.items():
        params = {p: d for p, _, d in their_signature(last, function)}
        assert params[name] == theirs and inspect.signature(getattr(fm, function)).parameters[name].default == ours


def dataclass_fields(archive: zipfile.ZipFile, path: str, cls: str) -> list[str]:
    tree = module(archive, path)
    definition = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return [n.target.id for n in definition.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.startswith("_")]


def class_methods(archive: zipfile.ZipFile, path: str, cls: str) -> set[str]:
    tree = module(archive, path)
    definition = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return {n.name for n in definition.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}


@pytest.mark.parametrize("path, cls, ours", [
    (f"{TYPES}/training_run.py", "TrainingRun", fm.TrainingRun),
    (f"{TYPES}/training_run.py", "TrainingEvent", fm.TrainingEvent),
    (f"{TYPES}/training_constants.py", "TrainingModelConstants", fm.TrainingModelConstants),
])
def test_the_returned_objects_have_the_attributes_of_1_1_8_in_order(last, path, cls, ours):
    theirs = dataclass_fields(last, path, cls)
    mine = list(inspect.signature(ours).parameters)
    assert mine[: len(theirs)] == theirs
    missing = {m for m in class_methods(last, path, cls) - {"from_mapi_response"} if not hasattr(ours, m)}
    assert not missing, f"{cls} lacks {sorted(missing)}"


def test_run_status_has_the_service_names_and_methods(last):
    path = f"{TYPES}/run_status.py"
    tree = module(last, path)
    definition = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RunStatus")
    members = [n.targets[0].id for n in definition.body if isinstance(n, ast.Assign)]
    assert [s.name for s in fm.RunStatus] == members
    missing = {m for m in class_methods(last, path, "RunStatus") if not hasattr(fm.RunStatus, m)}
    assert not missing, missing
