"""The `prepare` step: analyze, then write `data/` atomically; a finished one is not redone.

Writing goes to a temp folder next to `data/`, which is renamed into place, and `_SUCCESS`
(holding the stats) is written last by an atomic rename. A `data/` without `_SUCCESS` is a
half-written leftover of a killed attempt and is redone from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import UserError
from .analysis import Analysis, PackedSplit, run_analysis
from .packing import fill_arrays
from .store import PackedArrays, allocate_split, write_meta

log = logging.getLogger(__name__)
SUCCESS = "_SUCCESS"
STATS = "stats.json"


def local_dir(uri: str) -> Path:
    """The work dir is a local or mounted path (a PVC); `file://` is accepted too."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        raise UserError(f"work_dir {uri}: prepared data must go to a local or mounted path")
    return Path(uri)


def completed(data_dir: Path) -> dict[str, Any] | None:
    """The recorded result fields of a finished preparation, or None."""
    marker = data_dir / SUCCESS
    return json.loads(marker.read_text()) if marker.is_file() else None


def split_meta(config: RunConfig, analysis: Analysis, split: PackedSplit) -> dict[str, Any]:
    stats = split.report.stats
    return {
        "context_length": analysis.report.context_length,
        "num_sequences": stats.sequences,
        "samples": stats.samples,
        "tokens": stats.tokens,
        "truncated_samples": stats.truncated_samples,
        "packing_efficiency": stats.packing_efficiency,
        "tokenizer": config.model,
        "task_type": config.task_type.value,
    }


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def write_split_files(folder: Path, config: RunConfig, analysis: Analysis, split: PackedSplit) -> None:
    meta = split_meta(config, analysis, split)
    arrays: PackedArrays = allocate_split(folder, meta["num_sequences"], meta["context_length"],
                                          pad_id(analysis.tokenizer))
    fill_arrays(arrays, split.samples, split.bins)
    for array in arrays.arrays().values():
        array.flush()
    write_meta(folder, meta)


def write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(text)
    os.replace(temp, path)


def write_data(data_dir: Path, config: RunConfig, analysis: Analysis) -> dict[str, Any]:
    fields = analysis.report.result_fields()
    temp = data_dir.with_name(f".{data_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for name, split in analysis.splits.items():
            write_split_files(temp / name, config, analysis, split)
        (temp / STATS).write_text(json.dumps(fields, indent=2, sort_keys=True))
        if data_dir.exists():  # half-written by an earlier attempt (no marker): replace it
            shutil.rmtree(data_dir)
        os.replace(temp, data_dir)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    write_atomically(data_dir / SUCCESS, json.dumps(fields, sort_keys=True))
    return fields


def run_prepare(config: RunConfig) -> dict[str, Any]:
    """Prepare train (and eval) data under work_dir/data; returns the result fields
    (`dataStats`, plus `evalDataStats` with eval data)."""
    data_dir = local_dir(config.data_dir)
    done = completed(data_dir)
    if done is not None:
        log.info("data already prepared in %s: not redone", data_dir)
        return done
    analysis = run_analysis(config)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    return write_data(data_dir, config, analysis)
