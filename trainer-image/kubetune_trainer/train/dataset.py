"""Prepared (packed) data -> Composer DataSpecs.

Attention must not cross the boundaries of samples packed into one row. With flash-attention 2
or FlexAttention the model finds the boundaries itself from `position_ids` (they restart at 0
per sample: FA2's varlen path, Flex's document mask); with SDPA the collator adds a 4-D
block-diagonal causal mask built from `sequence_ids`. `position_ids` are passed either way, so each sample sees the same positions
as if it stood alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from composer.core import DataSpec
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

from ..contract import DATA_MARKER
from ..data.prepare import local_dir
from ..data.store import PackedArrays, open_split
from ..errors import UserError


class PackedDataset(Dataset):
    """Rows of a memory-mapped split; only the rows a batch needs are read."""

    def __init__(self, split: PackedArrays):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(row.astype(np.int64)) for name, row in self.split.row(index).items()}


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] sample ids -> [B, 1, L, L] boolean mask (True: may attend), causal within a sample.

    Padding (id 0) attends only to padding, so no row is empty (an empty row makes NaNs)."""
    length = sequence_ids.shape[-1]
    same_sample = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    return (same_sample & causal)[:, None]


@dataclass(frozen=True)
class PackedCollator:
    block_mask: bool  # False when the attention kernel separates samples by position_ids

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        if self.block_mask:
            batch["attention_mask"] = block_causal_mask(batch["sequence_ids"])
        return batch  # sequence_ids stays for token counting; the model's forward ignores it


def tokens_in_batch(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Real tokens (not padding) for `Ntok` durations and throughput; loss tokens for Composer's
    token-weighted gradient accumulation."""
    return {"total": int((batch["sequence_ids"] > 0).sum()),
            "loss_generating": int((batch["labels"] != -100).sum())}


def open_prepared(config_data_dir: str, split: str) -> PackedArrays:
    """Open one split of a finished preparation; a missing one is the user's problem to fix."""
    data_dir = local_dir(config_data_dir)
    folder = data_dir / split
    if not (data_dir / DATA_MARKER).is_file() or not (folder / "meta.json").is_file():
        raise UserError(f"prepared data {folder} is missing or incomplete: run the prepare step first",
                        "PreparedDataMissing")
    arrays = open_split(folder)
    if len(arrays) == 0:
        raise UserError(f"prepared data {folder} holds no sequences", "PreparedDataMissing")
    return arrays


def data_spec(split: PackedArrays, batch_size: int, *, block_mask: bool, shuffle: bool,
              seed: int) -> DataSpec:
    """A rank's DataSpec: a DistributedSampler seeded from the run config, so a resumed run
    sees the same order and Composer can fast-forward to the saved batch."""
    dataset = PackedDataset(split)
    sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=False, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
                        collate_fn=PackedCollator(block_mask=block_mask))
    return DataSpec(loader, get_num_tokens_in_batch=tokens_in_batch)
