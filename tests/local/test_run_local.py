"""`kubetune run RUN.yaml --local`: the whole lifecycle as local processes, as the quick start runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"

LOAD_AND_GENERATE = """
import sys, transformers
folder = sys.argv[1]
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
model = transformers.AutoModelForCausalLM.from_pretrained(folder)
ids = tokenizer("What does an operator do?", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=5, do_sample=False)
print(out.shape[1] - ids.shape[1])
"""


def quickstart_with(tmp_path: Path, model: Path, **spec) -> Path:
    """The shipped quick-start run, pointed at the session's tiny model."""
    document = yaml.safe_load(QUICKSTART.read_text())
    document["spec"].update(model=str(model), **spec)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def kubetune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def registered_versions(workdir: Path, name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_model_versions(f"name = '{name}'")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("local")
    run_file, workdir = quickstart_with(tmp, tiny_model_dir), tmp / "work"
    started = time.monotonic()
    done = kubetune("run", str(run_file), "--local", "--workdir", str(workdir))
    return done, workdir, run_file, time.monotonic() - started


def test_quickstart_runs_end_to_end_and_registers_a_loadable_model(finished_run):
    done, workdir, _, seconds = finished_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for event in ("CREATED", "VALIDATED", "DATA_VALIDATED", "TRAIN_STARTED", "CHECKPOINT_SAVED",
                  "TRAIN_FINISHED", "REGISTERED", "COMPLETED"):
        assert event in out, out
    assert "] 100.0%" in out  # live progress reached the terminal, as the SDK draws it
    assert "registered model: main.demo.quickstart version 1" in out
    folder = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                  if line.startswith("model folder:"))
    assert (Path(folder) / "model.safetensors").exists()
    # `transformers` alone (no kubetune on the path) loads the folder and generates.
    generated = subprocess.run([sys.executable, "-I", "-c", LOAD_AND_GENERATE, folder],
                               capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert int(generated.stdout.strip().splitlines()[-1]) > 0
    assert len(registered_versions(workdir, "main.demo.quickstart")) == 1
    status = json.loads((workdir / "quickstart" / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["dataStats"]["samples"] == 64
    print(f"local quick start: {seconds:.0f}s")


def test_running_again_is_idempotent(finished_run):
    done, workdir, run_file, _ = finished_run
    assert done.returncode == 0
    again = kubetune("run", str(run_file), "--local", "--workdir", str(workdir))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "version 1" in again.stdout
    assert len(registered_versions(workdir, "main.demo.quickstart")) == 1


def test_bad_data_fails_with_the_file_line_and_rule(tmp_path, tiny_model_dir):
    broken = REPO / "tests" / "trainer" / "data" / "broken" / "ift_broken.jsonl"
    run_file = quickstart_with(tmp_path, tiny_model_dir, trainDataPath=str(broken), evalDataPath=str(broken))
    done = kubetune("run", str(run_file), "--local", "--workdir", str(tmp_path / "work"))
    assert done.returncode == 1
    assert "Failed: DataValidationFailed" in done.stderr
    assert f"{broken}:3: missing key 'response'" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "work" / "storage" / "default" / "quickstart" / "checkpoints").exists()


def test_an_invalid_spec_fails_before_anything_runs(tmp_path, tiny_model_dir):
    run_file = quickstart_with(tmp_path, tiny_model_dir, trainingDuration="forever")
    done = kubetune("run", str(run_file), "--local", "--workdir", str(tmp_path / "work"))
    assert done.returncode == 1
    assert "spec.trainingDuration" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "work").exists()
