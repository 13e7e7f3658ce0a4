"""The prepared-data format: array names, dtypes and memory-mapped reading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kubetune_trainer.data.packing import Sample, pack_samples
from kubetune_trainer.data.store import ARRAY_NAMES, SplitWriter, open_split, write_split

META = {"context_length": 4, "num_sequences": 1, "samples": 2, "tokens": 4, "truncated_samples": 0,
        "packing_efficiency": 1.0, "tokenizer": "tiny", "task_type": "CONTINUED_PRETRAIN"}


def arrays():
    samples = [Sample(np.array([1, 2], np.int32), np.ones(2, bool)), Sample(np.array([3, 4], np.int32), np.ones(2, bool))]
    return pack_samples(samples, context_length=4, pad_id=0)


def test_written_split_reopens_memory_mapped_with_the_contract_names(tmp_path):
    folder = write_split(tmp_path / "train", arrays(), META)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{n}.npy" for n in ARRAY_NAMES] + ["meta.json"])
    opened = open_split(folder)
    assert isinstance(opened.input_ids, np.memmap) and opened.input_ids.dtype == np.int32
    assert len(opened) == 1 and opened.context_length == 4 and opened.meta == META
    row = opened.row(0)
    assert row["input_ids"].tolist() == [1, 2, 3, 4] and row["sequence_ids"].tolist() == [1, 1, 2, 2]
    assert json.loads((folder / "meta.json").read_text())["task_type"] == "CONTINUED_PRETRAIN"


def test_meta_without_a_contract_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        write_split(tmp_path / "train", arrays(), {k: v for k, v in META.items() if k != "tokenizer"})


def test_a_split_written_block_by_block_reads_back_as_one(tmp_path):
    block = arrays()
    writer = SplitWriter(tmp_path / "s", num_sequences=2, context_length=4)
    writer.write(block)
    writer.write(block)
    writer.close({**META, "num_sequences": 2})
    opened = open_split(tmp_path / "s")
    for name, array in block.arrays().items():
        assert np.asarray(getattr(opened, name)).tolist() == array.tolist() * 2
