"""Packed data: masks that keep samples apart, token counts, and the missing-data error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kubetune_trainer.errors import UserError
from kubetune_trainer.train.dataset import (PackedCollator, PackedDataset, block_causal_mask, data_spec,
                                            open_prepared, tokens_in_batch)

from .conftest import pack, random_rows, write_prepared

SAMPLE_A = [5, 40, 41, 42, 43, 44, 45]
SAMPLE_B = [5, 70, 71, 72, 73]


def test_block_causal_mask_is_causal_within_each_sample_only():
    mask = block_causal_mask(torch.tensor([[1, 1, 2, 2, 2, 0]]))
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only padding: no empty softmax row
    ], dtype=torch.bool)
    assert mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0], expected)


def rows_of(*samples_per_row):
    return [{k: torch.from_numpy(v.astype(np.int64)) for k, v in pack(list(samples)).items()}
            for samples in samples_per_row]


def test_collator_adds_masks_only_without_flash_attention():
    rows = rows_of([SAMPLE_A, SAMPLE_B], [SAMPLE_B])
    masked = PackedCollator(block_mask=True)(rows)
    assert masked["attention_mask"].shape == (2, 1, 32, 32) and masked["attention_mask"].dtype == torch.bool
    varlen = PackedCollator(block_mask=False)(rows)
    assert "attention_mask" not in varlen
    assert varlen["position_ids"][0, len(SAMPLE_A)] == 0  # restarts at the second sample: FA2's cue


def test_token_counts_exclude_padding():
    batch = PackedCollator(block_mask=False)(rows_of([SAMPLE_A, SAMPLE_B], [SAMPLE_B]))
    counts = tokens_in_batch(batch)
    assert counts["total"] == len(SAMPLE_A) + 2 * len(SAMPLE_B)
    assert counts["loss_generating"] == len(SAMPLE_A) - 1 + 2 * (len(SAMPLE_B) - 1)


def logits_of_a(model, rows, start, block_mask=True):
    batch = PackedCollator(block_mask=block_mask)(rows)
    del batch["sequence_ids"]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return logits[0, start:start + len(SAMPLE_A)]


@pytest.fixture(scope="module")
def sdpa_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


def test_a_packed_sample_sees_nothing_of_its_neighbour(sdpa_model):
    alone = logits_of_a(sdpa_model, rows_of([SAMPLE_A]), start=0)
    after_b = logits_of_a(sdpa_model, rows_of([SAMPLE_B, SAMPLE_A]), start=len(SAMPLE_B))
    torch.testing.assert_close(after_b, alone, rtol=1e-5, atol=1e-5)


def test_without_the_mask_the_neighbour_leaks_in(sdpa_model):
    """The control: plain causal attention over the packed row changes A's logits."""
    rows = rows_of([SAMPLE_B, SAMPLE_A])
    alone = logits_of_a(sdpa_model, rows_of([SAMPLE_A]), start=0)
    leaky = logits_of_a(sdpa_model, rows, start=len(SAMPLE_B), block_mask=False)
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_dataset_rows_and_seeded_order(tmp_path):
    write_prepared(tmp_path / "data", "train", random_rows(8, seed=3))
    split = open_prepared(str(tmp_path / "data"), "train")
    assert len(PackedDataset(split)) == 8 and PackedDataset(split)[0]["input_ids"].dtype == torch.int64

    def order(seed):
        spec = data_spec(split, 2, block_mask=True, shuffle=True, seed=seed)
        spec.dataloader.sampler.set_epoch(0)
        return [b["input_ids"][:, 0].tolist() for b in spec.dataloader]

    assert order(17) == order(17) and order(17) != order(18)


def test_missing_prepared_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="prepare") as error:
        open_prepared(str(tmp_path / "data"), "train")
    assert error.value.reason == "PreparedDataMissing"
    write_prepared(tmp_path / "data", "train", random_rows(2, seed=0))
    (tmp_path / "data" / "_SUCCESS").unlink()  # half-written by a killed prepare
    with pytest.raises(UserError):
        open_prepared(str(tmp_path / "data"), "train")
