"""The `prepare` step: analyze, then write `data/` atomically; a finished one is not redone.

Writing goes to a temp folder next to `data/`, which is renamed into place, and `_SUCCESS`
(holding the stats) is written last by an atomic rename. A `data/` without `_SUCCESS` is a
half-written leftover of a killed attempt and is redone from scratch.

With `dataPrep.parallelism` N > 1 the prepare Job runs N pods (an Indexed Job; the operator
sets KUBETUNE_PREP_SHARD and KUBETUNE_PREP_SHARDS). Each writes its part of every split to
`data-parts/` (atomically, so a retried pod skips a finished part); pod 0 then waits for all
parts and merges them into `data/` exactly as one pod would have written it, and only it
reports the statistics.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig, is_object_store
from ..contract import DATA_MARKER, ENV_PREP_SHARD, ENV_PREP_SHARDS
from ..errors import UserError
from ..results import write_json_atomically
from .analysis import Encoder, Setup, Shard, available_cpus, checked_report, read_part, setup, split_report
from .packing import empty_arrays, fill_block
from .parts import Merged, Part, SampleReader, is_done, load_part, merge
from .read_ahead import ReadAhead
from .store import SplitWriter

log = logging.getLogger(__name__)
STATS = "stats.json"
PARTS = "data-parts"  # next to data/ in the work dir
BLOCK_BYTES = 4 * 2**20  # rows written at a time, per array (small enough to share out evenly)
WAIT_SECONDS = 2.0  # pod 0 polls for the other parts this often


def local_dir(uri: str) -> Path:
    """The work dir is a local or mounted path (a PVC); `file://` is accepted too."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        raise UserError(f"work_dir {uri}: prepared data must go to a local or mounted path")
    return Path(uri)


def completed(data_dir: Path) -> dict[str, Any] | None:
    """The recorded result fields of a finished preparation, or None."""
    marker = data_dir / DATA_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def shard_from_env(config: RunConfig) -> Shard | None:
    """This pod's shard, from the operator's variables; None: this pod has nothing to do."""
    count = int(os.environ.get(ENV_PREP_SHARDS) or 1)
    number = int(os.environ.get(ENV_PREP_SHARD) or 0)
    if count > 1 and is_object_store(config.remote_work_dir or config.work_dir):
        # Each pod stages its own copy of an object-store work dir, so parts would never meet.
        log.info("object-store work dir: pod 0 prepares all the data, pod %d has nothing to do", number)
        return Shard(0, 1) if number == 0 else None
    return Shard(number, count)


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def split_meta(config: RunConfig, context_length: int, stats) -> dict[str, Any]:
    return {
        "context_length": context_length,
        "num_sequences": stats.sequences,
        "samples": stats.samples,
        "tokens": stats.tokens,
        "truncated_samples": stats.truncated_samples,
        "dropped_samples": stats.dropped_samples,
        "packing_efficiency": stats.packing_efficiency,
        "tokenizer": config.model,
        "task_type": config.task_type.value,
    }


@dataclass(frozen=True)
class RowBlocks:
    """A split's packed rows, written a block of rows at a time, each sample read back from its
    part; blocks are independent, so forked processes share them out."""

    merged: Merged
    order: np.ndarray  # samples, row by row (see `packing.pack_compact`)
    bounds: np.ndarray  # row i holds order[bounds[i]:bounds[i + 1]]
    context_length: int
    pad: int
    writer: SplitWriter
    per_block: int

    def write(self, first: int, reader: SampleReader) -> None:
        count = min(self.per_block, len(self.bounds) - 1 - first)
        block = empty_arrays(count, self.context_length, self.pad)
        row_bounds = self.bounds[first:first + count + 1]
        ids, mask, lengths = reader.read(self.order[row_bounds[0]:row_bounds[-1]])
        fill_block(block, ids, mask, lengths, np.repeat(np.arange(count), np.diff(row_bounds)))
        self.writer.write_at(first, block)


# The rows of the split being written, for the forked processes that write its blocks.
_rows: RowBlocks | None = None


def _write_blocks(firsts: list[int]) -> None:
    assert _rows is not None
    reader = SampleReader(_rows.merged)
    try:
        for first in firsts:
            _rows.write(first, reader)
    finally:
        reader.close()


def write_rows(folder: Path, merged: Merged, bins: tuple[np.ndarray, np.ndarray], context_length: int,
               pad: int, meta: dict[str, Any], processes: int) -> None:
    """Lay the packed rows out block by block; with several blocks, `processes` forked
    processes write every `processes`-th block each (the same bytes, in half the time on 2 CPUs)."""
    global _rows
    order, bounds = bins
    rows = len(bounds) - 1
    writer = SplitWriter(folder, rows, context_length)
    per_block = max(1, BLOCK_BYTES // (4 * context_length))
    firsts = list(range(0, rows, per_block))
    _rows = RowBlocks(merged, order, bounds, context_length, pad, writer, per_block)
    try:
        shares = [firsts[number::processes] for number in range(min(processes, len(firsts)))]
        if len(shares) < 2:
            _write_blocks(firsts)
        else:
            with ProcessPoolExecutor(len(shares), mp_context=get_context("fork")) as pool:
                for done in [pool.submit(_write_blocks, share) for share in shares]:
                    done.result()
    finally:
        _rows = None
    writer.close(meta)


def write_data(data_dir: Path, config: RunConfig, ready: Setup, parts: dict[str, list[Part]],
               processes: int | None = None) -> dict[str, Any]:
    """Merge each split's parts, check, pack and write `data/`; the result fields."""
    merged = {split: merge(split_parts, config.max_reported_errors) for split, split_parts in parts.items()}
    packed = {split: split_report(split, ready.sources[split], merged[split], ready.context_length)
              for split in merged}
    report = checked_report(config, ready.context_length, {split: pair[0] for split, pair in packed.items()})
    fields = report.result_fields()
    temp = data_dir.with_name(f".{data_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for split, (summary, bins) in packed.items():
            meta = split_meta(config, ready.context_length, summary.stats)
            write_rows(temp / split, merged[split], bins, ready.context_length, pad_id(ready.tokenizer), meta,
                       processes or available_cpus())
        (temp / STATS).write_text(json.dumps(fields, indent=2, sort_keys=True))
        if data_dir.exists():  # half-written by an earlier attempt (no marker): replace it
            shutil.rmtree(data_dir)
        os.replace(temp, data_dir)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    write_json_atomically(data_dir / DATA_MARKER, fields)
    return fields


def part_folder(root: Path, split: str, shard: Shard) -> Path:
    return root / f"{split}-{shard.number}-of-{shard.count}"


def write_part(config: RunConfig, uri: str, encoder: Encoder, shard: Shard, folder: Path,
               processes: int | None, ahead: ReadAhead | None = None) -> None:
    """This shard's part of a split, written atomically; a finished one is kept."""
    if is_done(folder):
        return
    temp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        read_part(config, uri, encoder, shard, temp, processes, ahead)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temp, folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_parts(folders: list[Path], timeout: float | None) -> None:
    """Pod 0 waits for the others; a pod that fails for good fails the Job, which ends this one."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not all(is_done(folder) for folder in folders):
        if deadline is not None and time.monotonic() > deadline:
            missing = [folder.name for folder in folders if not is_done(folder)]
            raise UserError(f"data preparation: parts {missing} never finished", "DataPrepIncomplete")
        time.sleep(WAIT_SECONDS)


def run_prepare(config: RunConfig, shard: Shard | None = None, processes: int | None = None,
                wait_timeout: float | None = None) -> dict[str, Any]:
    """Prepare train (and eval) data under work_dir/data; returns the result fields
    (`dataStats`, plus `evalDataStats` with eval data; nothing from pods other than pod 0)."""
    shard = shard or shard_from_env(config)
    if shard is None:
        return {}
    data_dir = local_dir(config.data_dir)
    done = completed(data_dir)
    if done is not None:
        log.info("data already prepared in %s: not redone", data_dir)
        return done if shard.number == 0 else {}
    ready = setup(config, shard)
    root = data_dir.with_name(PARTS)
    try:
        encoder = Encoder.load(config.model, config.task_type, ready.context_length, ready.tokenizer)
        for split, uri in ready.sources.items():
            write_part(config, uri, encoder, shard, part_folder(root, split, shard), processes,
                       ready.ahead if split == "train" else None)
    finally:
        ready.close()
    if shard.number != 0:
        return {}
    folders = {split: [part_folder(root, split, Shard(number, shard.count)) for number in range(shard.count)]
               for split in ready.sources}
    wait_for_parts([folder for split_folders in folders.values() for folder in split_folders], wait_timeout)
    parts = {split: [load_part(folder) for folder in split_folders] for split, split_folders in folders.items()}
    try:
        return write_data(data_dir, config, ready, parts, processes)
    finally:
        if completed(data_dir) is not None or shard.count == 1:
            shutil.rmtree(root, ignore_errors=True)
