"""Every example TrainingRun is valid, and the runnable ones pass the data pre-flight."""

from pathlib import Path

import pytest
import yaml

from kubetune.api import parse_training_run
from kubetune.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
LOCAL = [path for path in EXAMPLES if yaml.safe_load(path.read_text())["spec"]["model"] == "build/tiny-model"]


def test_there_is_a_runnable_example_per_task_type():
    tasks = {yaml.safe_load(p.read_text())["spec"].get("taskType", "INSTRUCTION_FINETUNE") for p in LOCAL}
    assert tasks == {"INSTRUCTION_FINETUNE", "CHAT_COMPLETION", "CONTINUED_PRETRAIN"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses(path):
    body = yaml.safe_load(path.read_text())
    assert parse_training_run({**body, "metadata": {**body["metadata"], "namespace": "default"}})


@pytest.mark.parametrize("path", LOCAL, ids=lambda p: p.name)
def test_runnable_examples_pass_the_preflight(path, tiny_model_dir, tmp_path, monkeypatch, capsys):
    body = yaml.safe_load(path.read_text())
    body["spec"]["model"] = str(tiny_model_dir)
    run_file = tmp_path / path.name
    run_file.write_text(yaml.safe_dump(body))
    monkeypatch.chdir(REPO)  # the examples' data paths are relative to the repo root
    assert main(["validate", str(run_file)]) == 0, capsys.readouterr().err
    assert "data valid" in capsys.readouterr().out
