"""The prepare step and the validate pre-flight, end to end on the example data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kubetune_trainer.config import TaskType
from kubetune_trainer.data import PrepFailed, analyze, run_prepare
from kubetune_trainer.data import analysis as analysis_module
from kubetune_trainer.data import prepare as prepare_module
from kubetune_trainer.data.analysis import Shard
from kubetune_trainer.data.encoding import encode_one
from kubetune_trainer.data.rules import Text
from kubetune_trainer.data.store import IGNORE_INDEX, open_split
from kubetune_trainer.errors import DataValidationFailed, UserError

from .conftest import BROKEN, EXAMPLES

IFT, CHAT, CPT = TaskType.INSTRUCTION_FINETUNE, TaskType.CHAT_COMPLETION, TaskType.CONTINUED_PRETRAIN


def sample_runs(sequence_ids: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each sample in a row."""
    runs, start = [], 0
    for index in range(1, len(sequence_ids) + 1):
        if index == len(sequence_ids) or sequence_ids[index] != sequence_ids[start]:
            if sequence_ids[start]:
                runs.append((start, index))
            start = index
    return runs


def check_packing_invariants(split) -> None:
    for number in range(len(split)):
        row = split.row(number)
        runs = sample_runs(row["sequence_ids"])
        assert [row["sequence_ids"][start] for start, _ in runs] == list(range(1, len(runs) + 1))
        for start, end in runs:  # positions restart, and the boundary token is never learned
            assert row["position_ids"][start:end].tolist() == list(range(end - start))
            assert row["labels"][start] == IGNORE_INDEX
        padding = row["sequence_ids"] == 0
        assert (row["labels"][padding] == IGNORE_INDEX).all()
        if runs:
            assert not padding[: runs[-1][1]].any()  # samples first, padding only at the end


def learned_texts(tokenizer, split) -> list[str]:
    texts = []
    for number in range(len(split)):
        row = split.row(number)
        for start, end in sample_runs(row["sequence_ids"]):
            labels = row["labels"][start:end]
            texts.append(tokenizer.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False))
    return texts


def test_instruction_data_is_prepared_in_the_contract_format(make_config, tokenizer):
    config = make_config(EXAMPLES / "ift.jsonl")
    result = run_prepare(config)
    stats = result["dataStats"]
    split = open_split(Path(config.data_dir) / "train")
    assert split.context_length == 512 and split.meta["context_length"] == 512  # min(8192, model max)
    assert stats["samples"] == 64 and stats["truncatedSamples"] == 0 and stats["sequences"] == len(split)
    assert stats["tokens"] == int((np.asarray(split.sequence_ids) > 0).sum())
    assert stats["packingEfficiency"] == round(stats["tokens"] / (len(split) * 512), 4)
    check_packing_invariants(split)
    rows = [json.loads(line) for line in (EXAMPLES / "ift.jsonl").read_text().splitlines()]
    responses = sorted((row.get("response") or row["completion"]) + "</s>" for row in rows)
    assert sorted(learned_texts(tokenizer, split)) == responses
    data = Path(config.data_dir)
    assert json.loads((data / "_SUCCESS").read_text()) == result == json.loads((data / "stats.json").read_text())
    assert split.meta["task_type"] == "INSTRUCTION_FINETUNE" and split.meta["tokenizer"] == config.model


def test_chat_data_with_eval_learns_assistant_turns_only(make_config, tokenizer):
    config = make_config(EXAMPLES / "chat.jsonl", CHAT, eval_data_path=str(EXAMPLES / "chat.jsonl"),
                         context_length=128)
    result = run_prepare(config)
    assert result["evalDataStats"] == result["dataStats"]
    split = open_split(Path(config.data_dir) / "eval")
    check_packing_invariants(split)
    expected = []
    for line in (EXAMPLES / "chat.jsonl").read_text().splitlines():
        turns = [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
        expected.append("".join(f"{content}<|end|>\n" for content in turns))
    assert sorted(learned_texts(tokenizer, split)) == sorted(expected)


def test_pretraining_truncates_to_the_context_length(make_config, tokenizer):
    files = sorted((EXAMPLES / "cpt").rglob("*.txt"))
    lengths = [len(encode_one(tokenizer, Text(path.read_text()))) for path in files]
    context = sorted(lengths)[2]  # some samples fit, the longer ones are cut
    result = run_prepare(make_config(EXAMPLES / "cpt", CPT, context_length=context))["dataStats"]
    assert result["samples"] == 5 and result["truncatedSamples"] == sum(n > context for n in lengths) > 0
    assert result["tokens"] == sum(min(n, context) for n in lengths)


def test_a_finished_preparation_is_not_redone(make_config, monkeypatch):
    config = make_config(EXAMPLES / "ift.jsonl")
    first = run_prepare(config)
    monkeypatch.setattr(analysis_module, "load_tokenizer", lambda model: pytest.fail("prepared again"))
    assert run_prepare(config) == first


def test_a_half_written_preparation_is_redone(make_config):
    config = make_config(EXAMPLES / "ift.jsonl")
    data = Path(config.data_dir)
    (data / "train").mkdir(parents=True)
    (data / "train" / "input_ids.npy").write_bytes(b"torn")
    result = run_prepare(config)
    assert (data / "_SUCCESS").is_file() and len(open_split(data / "train")) == result["dataStats"]["sequences"]
    assert sorted(p.name for p in data.parent.iterdir()) == ["data"]  # no temp folder left


def test_context_length_above_the_model_max_is_rejected(make_config):
    with pytest.raises(UserError, match="contextLength 513 exceeds the model's maximum context of 512"):
        analyze(make_config(EXAMPLES / "ift.jsonl", context_length=513))


def test_bad_records_fail_with_file_line_rule_capped(make_config):
    path = BROKEN / "ift_broken.jsonl"
    config = make_config(path, max_reported_errors=3)
    with pytest.raises(DataValidationFailed) as failure:
        run_prepare(config)
    assert failure.value.reason == "DataValidationFailed"
    assert str(failure.value).splitlines() == [
        "7 invalid record(s); first 3:",
        f"  {path}:2: invalid JSON: Expecting value (column 39)",
        f"  {path}:3: missing key 'response' (or 'completion') (it has 'prompt')",
        f"  {path}:4: 'prompt' must be a string, got int",
    ]
    assert not Path(config.data_dir).exists()


def test_chat_role_problems_are_reported_per_line(make_config):
    path = BROKEN / "chat_broken.jsonl"
    with pytest.raises(PrepFailed) as failure:
        analyze(make_config(path, CHAT))
    report = failure.value.report
    assert report.invalid_records == 13 and report.train.stats.samples == 1
    assert [problem.location.line for problem in report.problems()] == list(range(2, 15))
    assert str(report.problems()[1]) == f"{path}:3: message 2: 'system' is allowed only as the first message"


def test_a_template_without_system_role_is_reported_per_line(make_config, tiny_model_no_system_dir):
    config = make_config(EXAMPLES / "chat.jsonl", CHAT, model=str(tiny_model_no_system_dir))
    with pytest.raises(PrepFailed) as failure:
        analyze(config)
    problems = failure.value.report.problems()
    assert [p.location.line for p in problems] == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61]
    assert problems[0].rule == "the model's chat template refused the conversation: System role not supported"


def test_analyze_reports_batches_and_writes_nothing(make_config):
    config = make_config(EXAMPLES / "ift.jsonl", context_length=64)
    report = analyze(config)
    assert report.ok and report.context_length == 64 and report.stats == report.train.stats
    assert report.stats.samples == 64
    assert report.batches_per_epoch(4) == math.ceil(report.train.stats.sequences / 4)
    assert report.result_fields() == {"dataStats": report.train.stats.to_result()}
    assert not Path(config.work_dir).exists()


def test_an_empty_file_has_no_records(make_config, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: no records found"):
        analyze(make_config(tmp_path / "empty.jsonl"))


def written(config) -> dict[str, list]:
    split = open_split(Path(config.data_dir) / "train")
    return {name: np.asarray(array).tolist() for name, array in split.arrays().items()}


def counted(pool_class, starts: list):
    """`pool_class`, recording each pool's arguments in `starts` as it starts."""
    class Counted(pool_class):
        def __init__(self, *args, **kwargs):
            starts.append(args)
            super().__init__(*args, **kwargs)
    return Counted


def test_worker_processes_and_shards_write_what_one_process_writes(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(analysis_module, "CHUNK", 8)  # 64 records: 8 chunks
    pools, writers = [], []
    monkeypatch.setattr(analysis_module, "ProcessPoolExecutor",
                        counted(analysis_module.ProcessPoolExecutor, pools))
    monkeypatch.setattr(prepare_module, "ProcessPoolExecutor", counted(prepare_module.ProcessPoolExecutor, writers))
    monkeypatch.setattr(prepare_module, "BLOCK_BYTES", 4 * 96 * 2)  # rows written two at a time
    serial = make_config(EXAMPLES / "chat.jsonl", CHAT, work_dir=str(tmp_path / "serial"), context_length=96)
    expected = run_prepare(serial, processes=1)
    assert pools == [] and writers == []
    pooled = make_config(EXAMPLES / "chat.jsonl", CHAT, work_dir=str(tmp_path / "pooled"), context_length=96)
    assert run_prepare(pooled, processes=2) == expected and pools == [(2,)] and writers == [(2,)]
    assert written(pooled) == written(serial) and expected["dataStats"]["sequences"] > 4
    # Three pods: 1 and 2 write their parts and report nothing; 0 merges, the same bytes result.
    sharded = make_config(EXAMPLES / "chat.jsonl", CHAT, work_dir=str(tmp_path / "sharded"), context_length=96)
    assert run_prepare(sharded, Shard(2, 3), processes=1) == {}
    assert sorted(p.name for p in (tmp_path / "sharded" / "data-parts").iterdir()) == ["train-2-of-3"]
    assert run_prepare(sharded, Shard(1, 3), processes=1) == {}
    assert run_prepare(sharded, Shard(0, 3), processes=1, wait_timeout=5) == expected
    assert written(sharded) == written(serial)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["data"]


def test_shard_zero_says_which_parts_never_came(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "WAIT_SECONDS", 0.05)
    config = make_config(EXAMPLES / "ift.jsonl")
    with pytest.raises(UserError, match=r"parts \['train-1-of-2'\] never finished"):
        run_prepare(config, Shard(0, 2), processes=1, wait_timeout=0.2)


def test_the_shard_comes_from_the_operator_variables(make_config, monkeypatch):
    config = make_config(EXAMPLES / "ift.jsonl")
    assert prepare_module.shard_from_env(config) == Shard(0, 1)
    monkeypatch.setenv("KUBETUNE_PREP_SHARD", "3")
    monkeypatch.setenv("KUBETUNE_PREP_SHARDS", "4")
    assert prepare_module.shard_from_env(config) == Shard(3, 4)
    staged = config.model_copy(update={"remote_work_dir": "s3://bucket/run"})
    assert prepare_module.shard_from_env(staged) is None  # parts would not meet: pod 0 does it all
