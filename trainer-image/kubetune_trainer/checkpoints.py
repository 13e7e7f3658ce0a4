"""A run's Composer checkpoints: their names, the `latest` pointer, and reading them back.

Composer saves `ep{e}-ba{b}-rank0.pt` files, or under FSDP with sharded state `ep{e}-ba{b}`
folders of `.distcp` shards indexed by a `.metadata` file written last, and points
`latest-rank0.pt` (a symlink) at the newest. Object stores have no symlinks: there the pointer is
a `<name>.symlink` object holding its target's name (Composer's convention). Torch is imported
where a checkpoint is read, not here: the storage layer (which the operator's local mode
imports) needs only the names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import UserError

log = logging.getLogger(__name__)

FOLDER = "checkpoints"  # under work_dir
FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"  # Composer's format strings
LATEST_FILENAME = "latest-rank{rank}.pt"
LATEST = "latest-rank0.pt"  # rank 0's pointer: the one every rank resumes from
LATEST_PATH = f"{FOLDER}/{LATEST}"  # relative to work_dir
POINTER_SUFFIX = ".symlink"
SHARD_SUFFIX = ".distcp"
SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded folder
SHARD_SUFFIXES = (SHARD_SUFFIX, SHARDED_METADATA)
# Monolithic `ep{e}-ba{b}-rank0.pt` files, or the `ep{e}-ba{b}` folders of sharded (FSDP) runs.
NAME = re.compile(r"ep(\d+)-ba(\d+)(-rank0\.pt)?")
# The parts of a checkpoint's `state` that its weights need; the optimizer state (as large as
# the model, or twice) is never read for them.
MODEL_STATE = ("model", "integrations")


# --- names -----------------------------------------------------------------------------------

def step(path: Path) -> tuple[int, int] | None:
    """(epoch, batch) of a checkpoint file or sharded folder; None for anything else."""
    match = NAME.fullmatch(path.name)
    if not match:
        return None
    is_file = match.group(3) is not None
    if (is_file and not path.is_file()) or (not is_file and not is_sharded(path)):
        return None
    return int(match.group(1)), int(match.group(2))


def older(names: Iterable[str], newest: str) -> list[str]:
    """Of checkpoint names (files or sharded folders, by name alone), those before `newest`,
    newest first: where a resume falls back to when `newest` is not whole."""
    at = _named_step(newest)
    found = [(step_at, name) for name in set(names) if (step_at := _named_step(name)) is not None]
    return [name for step_at, name in sorted(found, reverse=True) if at is not None and step_at < at]


def _named_step(name: str) -> tuple[int, int] | None:
    match = NAME.fullmatch(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


def listed(folder: Path) -> list[Path]:
    """Every checkpoint in `folder`, newest (highest epoch, batch) first."""
    entries = list(folder.iterdir()) if folder.is_dir() else []
    found = [(at, path) for path in entries if not path.is_symlink() and (at := step(path))]
    return [path for _, path in sorted(found, reverse=True)]


def follow(path: Path) -> Path:
    """A pointer's target: through a symlink, or a Composer `.symlink` file naming it."""
    if path.name.endswith(POINTER_SUFFIX) and path.is_file() and not path.is_symlink():
        path = path.parent / path.read_text().strip()
    return path.resolve()


def latest(folder: str | Path) -> Path | None:
    """The checkpoint rank 0's `latest` pointer names, if it is there."""
    pointer = Path(folder) / LATEST
    return pointer.resolve() if pointer.is_symlink() and pointer.exists() else None


def find_latest(folder: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, else the newest listed one."""
    found = latest(folder)
    if found is not None:
        return found
    newest = listed(folder)
    return newest[0] if newest else None


STORAGE_ALIGNMENT = 4096  # bytes: a page (torch.save's default is 64)


def align_storages() -> None:
    """Checkpoints saved from here on hold each tensor at a page boundary, so that `convert`
    copies a tensor into the safetensors file page for page (`weights_out.arranged`)."""
    import torch.utils.serialization.config as serialization

    serialization.save.storage_alignment = max(serialization.save.storage_alignment, STORAGE_ALIGNMENT)


# --- reading ---------------------------------------------------------------------------------

def read_state(checkpoint: Path, keys: Iterable[str] = MODEL_STATE) -> dict[str, Any]:
    """Those entries of a checkpoint's `state`, on CPU, from a file or a folder of shards."""
    keys = tuple(keys)
    try:
        state = _read_sharded(checkpoint, keys) if checkpoint.is_dir() else _read_file(checkpoint)
    except Exception as error:  # torch raises RuntimeError, pickle errors, EOFError, ... alike
        raise UserError(f"cannot read checkpoint {checkpoint}: {_first_line(error)}",
                        "CheckpointUnreadable") from error
    if not isinstance(state, dict) or not all(key in state for key in keys):
        raise UserError(f"checkpoint {checkpoint} is not a Composer checkpoint holding "
                        f"{', '.join('state.' + key for key in keys)}", "CheckpointUnreadable")
    return {key: state[key] for key in keys}


def model_weights(checkpoint: Path) -> dict[str, Any]:
    """The model's state dict, named as Composer's HuggingFaceModel names it (`model.` prefix)."""
    return read_state(checkpoint, ("model",))["model"]


def _read_file(checkpoint: Path) -> dict[str, Any]:
    import torch

    # weights_only=False: Composer pickles its own objects (timestamps, schedulers) next to the
    # tensors; the file comes from this run's own storage. mmap keeps the weights on disk until used.
    document = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
    return document.get("state") if isinstance(document, dict) else None


def _read_sharded(folder: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Gather the wanted entries of an FSDP checkpoint's shards into full tensors, in this one
    process, with torch.distributed.checkpoint's public loader: the metadata says each entry's
    shape and dtype, `dcp.load` fills tensors allocated from it and unpickles the rest."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    metadata = reader.read_metadata()
    prefixes = tuple(f"state.{key}" for key in keys)
    flat: dict[str, Any] = {}
    for name, entry in metadata.state_dict_metadata.items():
        if name in prefixes or name.startswith(tuple(p + "." for p in prefixes)):
            flat[name] = (None if isinstance(entry, BytesStorageMetadata)
                          else torch.empty(entry.size, dtype=entry.properties.dtype))
    dcp.load(flat, storage_reader=reader, no_dist=True)
    return _nest(flat, metadata.planner_data or {})["state"]


def _nest(flat: dict[str, Any], paths: dict[str, tuple]) -> dict[str, Any]:
    """Flattened `a.b.c` entries back into nested dicts (lists where a path step is an index),
    by the path each was saved under (the save planner records them in the metadata)."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        path = paths.get(name, (name,))
        node: Any = nested
        for part, following in zip(path, path[1:]):
            child = [] if isinstance(following, int) else {}
            if isinstance(node, list):
                node.extend([None] * (part + 1 - len(node)))
                node[part] = child if node[part] is None else node[part]
                node = node[part]
            else:
                node = node.setdefault(part, child)
        if isinstance(node, list):
            node.extend([None] * (path[-1] + 1 - len(node)))
        node[path[-1]] = value
    return nested


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- resuming --------------------------------------------------------------------------------

def defect(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (half-written, corrupted), or None if it can.

    A file must open and unpickle with its model state (tensors stay on disk, memory-mapped);
    a sharded folder must have its index and every shard the index names, at full length."""
    try:
        if checkpoint.is_dir():
            return _sharded_defect(checkpoint)
        read_state(checkpoint, ("model",))
    except UserError as error:
        return error.message.removeprefix(f"cannot read checkpoint {checkpoint}: ")
    return None


def _sharded_defect(folder: Path) -> str | None:
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as error:  # a missing or truncated index
        return f"no readable {SHARDED_METADATA}: {_first_line(error)}"
    for info in (metadata.storage_data or {}).values():
        shard = folder / info.relative_path
        if not shard.is_file() or shard.stat().st_size < info.offset + info.length:
            return f"shard {info.relative_path} is missing or shorter than its index says"
    return None


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Path | None  # None: start from the weights
    note: str | None = None  # set when the newest checkpoint was passed over: for a person


def resume_point(folder: str | Path) -> ResumePoint:
    """The newest checkpoint this run can resume from: the one `latest` names, else (that one
    half-written or corrupted) the newest older one that is whole. Checkpoints newer than the
    pointer were never committed by it and are not considered."""
    folder = Path(folder)
    named = latest(folder)
    candidates = listed(folder)
    if named is not None:
        at = step(named)
        candidates = [named, *(c for c in candidates if at is not None and (step(c) or at) < at)]
    skipped: list[str] = []
    for checkpoint in candidates:
        problem = defect(checkpoint)
        if problem is None:
            note = None if not skipped else f"{'; '.join(skipped)}: resumed from {checkpoint.name}"
            return _noted(ResumePoint(checkpoint, note))
        skipped.append(f"checkpoint {checkpoint.name} unreadable ({problem})")
    if skipped:
        return _noted(ResumePoint(None, f"{'; '.join(skipped)}: no whole checkpoint left, started "
                                        "from the initial weights"))
    return ResumePoint(None)


def _noted(point: ResumePoint) -> ResumePoint:
    if point.note:
        log.warning("%s", point.note)
    return point
