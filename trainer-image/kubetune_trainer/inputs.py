"""Checks of the inputs a run names (data, customWeightsPath) before they are read.

- Confinement: a local data or weights path is read as written, but a symlink in it may not lead
  out of where it was named: out of the folder the path names (a file's own folder), out of the
  run storage, or from one top folder of the storage (`<root>/<namespace>/<run>`) into another,
  such as another run's. Checked by `prepare` (and `kubetune validate`) and again by `train`.
- Reachability (`validateInputs`): the data is always read and validated by `prepare`; this makes
  a wrong `customWeightsPath` fail there too, on a CPU pod, instead of after the GPUs were granted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import fsspec

from .checkpoints import SHARD_SUFFIXES
from .config import RunConfig, is_object_store
from .errors import TransientError, UserError


DATA_AND_WEIGHTS = ("trainDataPath", "evalDataPath", "customWeightsPath")


def check_confined(config: RunConfig, fields: tuple[str, ...] = DATA_AND_WEIGHTS) -> None:
    """Refuse a data or weights path that a symlink leads out of where it was named."""
    root = None if is_object_store(config.work_dir) else Path(os.path.abspath(config.work_dir)).parent.parent
    named = {"trainDataPath": config.train_data_path, "evalDataPath": config.eval_data_path,
             "customWeightsPath": config.custom_weights_path}
    for field in fields:
        path = named[field]
        if path and "://" not in path:
            problem = escape(Path(os.path.abspath(path)), root)
            if problem:
                raise UserError(f"{field} {path}: {problem}; name the files where they are, or copy them "
                                "there", "InvalidInput")


def escape(path: Path, storage_root: Path | None) -> str | None:
    """Where a symlink at or under `path` leads out of it (see the module doc), or None."""
    if path.is_symlink() and (problem := _outside(path, path.parent)):
        return problem
    for link in _links_under(path):
        if problem := _outside(link, path):
            return problem
    if storage_root is not None and path.is_relative_to(storage_root):
        return _storage_escape(path, storage_root)
    return None


def _outside(link: Path, folder: Path) -> str | None:
    target, inside = Path(os.path.realpath(link)), Path(os.path.realpath(folder))
    if target.is_relative_to(inside):
        return None
    return f"the symlink {link} leads to {target}, outside {folder}"


def _storage_escape(path: Path, root: Path) -> str | None:
    """A link above `path` (a folder on its way) that leads out of its top folder of the storage."""
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if not real.is_relative_to(real_root):
        return f"it leads through a symlink to {real}, outside the run storage {root}"
    top, real_top = path.relative_to(root).parts[:2], real.relative_to(real_root).parts[:2]
    if top != real_top:
        return (f"it leads through a symlink to {real}, in {real_root.joinpath(*real_top)} instead of "
                f"{root.joinpath(*top)}")
    return None


def _links_under(folder: Path) -> Iterator[Path]:
    """Every symlink under `folder` (a file's path has none); links are listed, not followed."""
    if folder.is_dir():
        yield from _links_in(str(folder))


def _links_in(folder: str) -> Iterator[Path]:
    """os.walk's order (a folder's subfolders, then its files, then each subfolder), told from
    the listing alone: no Path and no lstat per file (50,000 data files took a second)."""
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError:  # as os.walk: an unreadable folder is skipped
        return
    subfolders = [entry for entry in entries if _is_dir(entry)]
    for entry in subfolders + [entry for entry in entries if not _is_dir(entry)]:
        if entry.is_symlink():
            yield Path(entry.path)
    for entry in subfolders:
        if not entry.is_symlink():
            yield from _links_in(entry.path)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def check_custom_weights(path: str | None) -> None:
    """A Composer checkpoint file, a `latest-*` pointer, or a folder of `.distcp` shards."""
    if not path:
        return
    try:
        fs, root = fsspec.core.url_to_fs(path)
        if not fs.exists(root):
            raise UserError(f"customWeightsPath {path}: no such file or folder", "CustomWeightsMissing")
        if fs.isdir(root) and not any(name.endswith(SHARD_SUFFIXES) for name in fs.ls(root, detail=False)):
            raise UserError(f"customWeightsPath {path}: a folder, but without sharded checkpoint "
                            "files (.distcp)", "CustomWeightsInvalid")
    except (ImportError, ValueError) as error:  # no filesystem for that scheme
        raise UserError(f"customWeightsPath {path}: unsupported location: {error}", "CustomWeightsInvalid") from error
    except OSError as error:  # a store that did not answer: worth another try
        raise TransientError(f"customWeightsPath {path}: unreachable: {error}", "InputUnreachable") from error
