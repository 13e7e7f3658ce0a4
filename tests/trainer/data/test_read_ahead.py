"""Reading and checking the first chunks in a forked reader while the tokenizer loads."""

from __future__ import annotations

import os
import time

import pytest

from kubetune_trainer.config import TaskType
from kubetune_trainer.data import PrepFailed, analyze, run_prepare
from kubetune_trainer.data import analysis as analysis_module
from kubetune_trainer.data import read_ahead as read_ahead_module
from kubetune_trainer.data.analysis import Shard, shard_chunks
from kubetune_trainer.data.read_ahead import Pickled, ReadAhead, checked, reads_ahead

from .conftest import BROKEN, EXAMPLES
from .test_prepare import written

IFT, CHAT, CPT = TaskType.INSTRUCTION_FINETUNE, TaskType.CHAT_COMPLETION, TaskType.CONTINUED_PRETRAIN


def reader(config, shard=Shard()) -> ReadAhead:
    return ReadAhead(config.task_type, lambda: shard_chunks(config, config.train_data_path, shard))


def no_reader_left(ahead: ReadAhead) -> bool:
    with pytest.raises(ChildProcessError):
        os.waitpid(ahead._pid, os.WNOHANG)  # reaped by take
    return True


@pytest.mark.parametrize("path, task", [(BROKEN / "ift_broken.jsonl", IFT), (BROKEN / "chat_broken.jsonl", CHAT),
                                        (EXAMPLES / "cpt", CPT)])
def test_chunks_read_ahead_are_the_chunks_checked_in_the_parent(make_config, monkeypatch, path, task):
    monkeypatch.setattr(analysis_module, "CHUNK", 1)
    config = make_config(path, task)
    ahead = reader(config, Shard(1, 2))  # a shard: every other chunk
    time.sleep(0.5)  # ample time to read these few records
    taken = ahead.take()
    expected = [(index, checked(task, chunk)) for index, chunk in shard_chunks(config, str(path), Shard(1, 2))]
    assert [index for index, _ in taken] == [index for index, _ in expected] and len(expected) >= 2
    for (_, pickled), (_, chunk) in zip(taken, expected):
        got = pickled.load()
        assert (got.examples, got.kept, got.broken) == (chunk.examples, chunk.kept, chunk.broken)
        assert [got.location(position) for position in range(len(got))] == \
               [chunk.location(position) for position in range(len(chunk))]
    assert ahead.take() == [] and no_reader_left(ahead)  # handed over once


def test_the_reader_holds_a_bounded_amount(make_config, monkeypatch):
    monkeypatch.setattr(analysis_module, "CHUNK", 4)
    monkeypatch.setattr(read_ahead_module, "MAX_BYTES", 1)  # any chunk is over it
    ahead = reader(make_config(EXAMPLES / "ift.jsonl"))
    time.sleep(0.5)
    assert [index for index, _ in ahead.take()] == [0]


def test_a_reader_that_fails_leaves_the_reading_to_the_parent(make_config, tmp_path):
    ahead = reader(make_config(tmp_path / "missing.jsonl"))
    assert ahead.take() == [] and no_reader_left(ahead)
    assert not reads_ahead(str(tmp_path / "missing.jsonl")) and not reads_ahead("s3://bucket/data.jsonl")
    (tmp_path / "table" / "_delta_log").mkdir(parents=True)
    assert not reads_ahead(str(tmp_path / "table")) and reads_ahead(str(EXAMPLES / "cpt"))


def test_prepare_writes_and_reports_the_same_with_chunks_read_ahead_or_not(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(analysis_module, "CHUNK", 8)  # several chunks: some read ahead, the rest by the parent
    taken, take = [], ReadAhead.take

    def recorded(self):
        chunks = take(self)
        taken.append(list(chunks))  # a copy: prepare drops them from its list as it sends them
        return chunks

    monkeypatch.setattr(ReadAhead, "take", recorded)
    ahead = make_config(EXAMPLES / "chat.jsonl", CHAT, work_dir=str(tmp_path / "ahead"), context_length=96)
    with_reader = run_prepare(ahead, processes=2)
    assert taken and all(isinstance(chunk, Pickled) for _, chunk in taken[0]) and taken[0][0][0] == 0
    monkeypatch.setattr(analysis_module, "reads_ahead", lambda uri: False)
    alone = make_config(EXAMPLES / "chat.jsonl", CHAT, work_dir=str(tmp_path / "alone"), context_length=96)
    assert run_prepare(alone, processes=2) == with_reader and written(alone) == written(ahead)
    monkeypatch.undo()
    with pytest.raises(PrepFailed) as ahead_failure:
        analyze(make_config(BROKEN / "ift_broken.jsonl"))
    monkeypatch.setattr(analysis_module, "reads_ahead", lambda uri: False)
    with pytest.raises(PrepFailed) as failure:
        analyze(make_config(BROKEN / "ift_broken.jsonl"))
    assert str(ahead_failure.value) == str(failure.value)
