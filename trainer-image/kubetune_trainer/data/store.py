"""The prepared-data format on disk (docs/contracts.md, "Prepared data format").

One folder per split (`data/train`, `data/eval`) holding four `int32` arrays of shape
`[num_sequences, context_length]` plus `meta.json`. Plain `.npy` files, so the trainer can
memory-map them and index any sequence in O(1) without a streaming dependency.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ARRAY_NAMES = ("input_ids", "labels", "position_ids", "sequence_ids")
META_FILE = "meta.json"
IGNORE_INDEX = -100  # label value where no loss counts (torch's cross-entropy default)
DTYPE = np.int32
META_KEYS = (
    "context_length", "num_sequences", "samples", "tokens", "truncated_samples",
    "packing_efficiency", "tokenizer", "task_type",
)


@dataclass(frozen=True)
class PackedArrays:
    """Packed sequences of one split; row i of every array describes sequence i.

    - input_ids: token ids, padded after the last sample.
    - labels: the token id where loss counts, IGNORE_INDEX elsewhere (prompt, padding, and the
      first token of every sample, so no loss crosses a sample boundary).
    - position_ids: restart at 0 at every sample start.
    - sequence_ids: 1-based index of the sample inside its row, 0 for padding.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    sequence_ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def context_length(self) -> int:
        return int(self.input_ids.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_NAMES}

    def row(self, index: int) -> dict[str, np.ndarray]:
        """One packed sequence as a dict of 1-D arrays (what a Dataset's __getitem__ returns)."""
        return {name: np.asarray(array[index]) for name, array in self.arrays().items()}


def write_split(path: str | Path, arrays: PackedArrays, meta: dict[str, Any]) -> Path:
    """Write one split's arrays and meta.json into `path` (created); return the folder.

    Atomicity is the caller's business (prepare writes into a temp folder, then renames).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {array.shape for array in arrays.arrays().values()}
    if len(shapes) != 1:
        raise ValueError(f"packed arrays disagree in shape: {sorted(shapes)}")
    for name, array in arrays.arrays().items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array, dtype=DTYPE))
    write_meta(folder, meta)
    return folder


class SplitWriter:
    """Writes a split's four `.npy` files a block of rows at a time, so a large split is written
    without holding it (or a memory map of it) in memory. Blocks land at their rows' offsets
    (`pwrite`), so processes that share the writer (forked) may write blocks in any order."""

    def __init__(self, path: str | Path, num_sequences: int, context_length: int):
        self.folder = Path(path)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.row_bytes = context_length * np.dtype(DTYPE).itemsize
        self.written = 0  # rows written front to back by `write`
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)), "fortran_order": False,
                  "shape": (num_sequences, context_length)}
        self.files = {}
        for name in ARRAY_NAMES:
            with open(self.folder / f"{name}.npy", "wb") as handle:
                np.lib.format.write_array_header_1_0(handle, header)
                self.header_bytes = handle.tell()
                handle.truncate(self.header_bytes + num_sequences * self.row_bytes)
            self.files[name] = os.open(self.folder / f"{name}.npy", os.O_WRONLY)

    def write(self, block: PackedArrays) -> None:
        """The next rows."""
        self.write_at(self.written, block)
        self.written += len(block)

    def write_at(self, first_row: int, block: PackedArrays) -> None:
        offset = self.header_bytes + first_row * self.row_bytes
        for name, array in block.arrays().items():
            data = memoryview(np.ascontiguousarray(array, dtype=DTYPE)).cast("B")
            done = 0
            while done < len(data):  # pwrite may write less than asked
                done += os.pwrite(self.files[name], data[done:], offset + done)

    def close(self, meta: dict[str, Any]) -> None:
        for handle in self.files.values():
            os.close(handle)
        write_meta(self.folder, meta)


def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"meta.json lacks {missing}")
    (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def open_split(path: str | Path) -> PackedArrays:
    """Memory-map a split written by `write_split` (read-only; nothing loaded up front)."""
    folder = Path(path)
    meta = json.loads((folder / META_FILE).read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAY_NAMES}
    return PackedArrays(**arrays, meta=meta)
