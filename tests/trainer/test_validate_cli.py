"""`kubetune validate RUN.yaml`: the pre-flight before any GPU, on the real tokenizer."""

from pathlib import Path

import yaml

from kubetune.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_yaml(tmp_path, model, data, **spec) -> str:
    document = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
                "metadata": {"name": "preflight"},
                "spec": {"model": str(model), "trainDataPath": str(data),
                         "registerTo": "main.tests.preflight", "contextLength": 64,
                         "globalBatchSize": 4, **spec}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def test_valid_input_reports_the_statistics(tmp_path, tiny_model_dir, capsys):
    path = run_yaml(tmp_path, tiny_model_dir, REPO / "examples/data/chat.jsonl",
                    taskType="CHAT_COMPLETION")
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert "samples                            64" in out
    for label in ("tokens", "truncated at 64", "packing efficiency", "batches per epoch (batch 4)"):
        assert label in out


def test_bad_records_are_listed_by_file_line_and_rule_with_exit_1(tmp_path, tiny_model_dir, capsys):
    broken = REPO / "tests/trainer/data/broken/ift_broken.jsonl"
    assert main(["validate", run_yaml(tmp_path, tiny_model_dir, broken)]) == 1
    err = capsys.readouterr().err
    assert "DataValidationFailed" in err
    assert f"{broken}:3: missing key 'response'" in err
    assert "Traceback" not in err


def test_context_length_above_the_model_max_is_refused(tmp_path, tiny_model_dir, capsys):
    path = run_yaml(tmp_path, tiny_model_dir, REPO / "examples/data/ift.jsonl", contextLength=100000)
    assert main(["validate", path]) == 1
    assert "contextLength" in capsys.readouterr().err


def test_data_prep_max_record_bytes_sets_the_largest_line_read(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "long.jsonl"
    long_line = '{"prompt": "' + "a" * 3000 + '", "response": " b"}\n'
    data.write_text('{"prompt": "short", "response": " ok"}\n' + long_line)
    assert main(["validate", run_yaml(tmp_path, tiny_model_dir, data, dataPrep={"maxRecordBytes": 2048})]) == 1
    err = capsys.readouterr().err
    assert f"{data}:2: line is {len(long_line) - 1:,} bytes, over the limit of 2,048 bytes per record" in err
    assert "raise dataPrep.maxRecordBytes" in err and "Traceback" not in err
    # The default (8 MiB) reads it.
    assert main(["validate", run_yaml(tmp_path, tiny_model_dir, data)]) == 0
