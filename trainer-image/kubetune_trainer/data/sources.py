"""Where records come from: files and folders (local or any fsspec URI), Delta tables and
Hugging Face datasets. Every reader yields `Record`s in a stable order with their location.

Detection, in order:
1. a folder (local or fsspec) holding `_delta_log` is a Delta table;
2. any other existing folder or file is read as files (JSONL, or `.txt` for pre-training);
3. a missing path without a scheme shaped `name/split` or `org/name/split` (the last part has no
   dot, so it is not a file name) is a Hugging Face dataset loaded with `datasets`;
4. anything else is a missing path: a UserError naming it.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from ..config import TaskType
from ..errors import TransientError, UserError
from .records import Location, Record, Unreadable

DELTA_LOG = "_delta_log"
HUB_PART = re.compile(r"^[\w.\-]+$")
HUB_SPLIT = re.compile(r"^[\w\-\[\]:%+]+$")  # train, test, train[:10%]


@dataclass(frozen=True)
class FileTree:
    """An fsspec filesystem and a root inside it, with the user's spelling for messages."""

    fs: Any
    root: str
    uri: str

    def display(self, path: str) -> str:
        """A file's name as the user would write it: their spelling of the root + the rest."""
        relative = posixpath.relpath(path, self.root)
        return self.uri if relative == "." else f"{self.uri.rstrip('/')}/{relative}"

    def files(self, suffix: str) -> list[str]:
        """Files under the root ending in `suffix`, recursive, sorted, hidden ones skipped."""
        if not self.fs.isdir(self.root):
            return [self.root]
        found = self.fs.find(self.root)
        return sorted(path for path in found if path.endswith(suffix) and not hidden(path, self.root))


def hidden(path: str, root: str) -> bool:
    relative = posixpath.relpath(path, root)
    return any(part.startswith(".") for part in relative.split("/"))


def file_tree(uri: str) -> FileTree:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    return FileTree(fs, root, uri)


def hub_dataset_name(path: str) -> tuple[str, str] | None:
    """`org/name/split` or `name/split` -> (dataset id, split); None if not shaped so."""
    if "://" in path or path.startswith(("/", ".", "~")):
        return None
    parts = path.split("/")
    if len(parts) not in (2, 3) or "." in parts[-1] or not HUB_SPLIT.match(parts[-1]):
        return None
    if not all(HUB_PART.match(part) for part in parts[:-1]):
        return None
    return "/".join(parts[:-1]), parts[-1]


# --- files -------------------------------------------------------------------------------------

def jsonl_value(line: bytes) -> Any:
    try:
        return json.loads(line.decode("utf-8").rstrip())
    except UnicodeDecodeError:
        return Unreadable("line is not valid UTF-8")
    except json.JSONDecodeError as error:
        return Unreadable(f"invalid JSON: {error.msg} (column {error.colno})")


def jsonl_records(tree: FileTree, path: str) -> Iterator[Record]:
    with tree.fs.open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():  # blank lines (a trailing newline, spacing) are not records
                yield Record(Location(tree.display(path), number), jsonl_value(line))


def text_record(tree: FileTree, path: str) -> Record:
    with tree.fs.open(path, "rb") as handle:
        raw = handle.read()
    try:
        value: Any = raw.decode("utf-8")
    except UnicodeDecodeError:
        value = Unreadable("file is not valid UTF-8 text")
    return Record(Location(tree.display(path)), value)


def file_records(tree: FileTree, task: TaskType) -> Iterator[Record]:
    suffix = ".txt" if task == TaskType.CONTINUED_PRETRAIN else ".jsonl"
    files = tree.files(suffix)
    if not files:
        raise UserError(f"{tree.uri}: no {suffix} files in this folder")
    for path in files:
        if task == TaskType.CONTINUED_PRETRAIN:
            yield text_record(tree, path)
        else:
            yield from jsonl_records(tree, path)


# --- tables and datasets -----------------------------------------------------------------------

def row_records(name: str, rows: Iterable[dict]) -> Iterator[Record]:
    for number, row in enumerate(rows, start=1):
        yield Record(Location(name, number), row)


def delta_rows(uri: str) -> Iterator[dict]:
    from deltalake import DeltaTable

    try:
        table = DeltaTable(uri)
    except Exception as error:  # deltalake raises its own TableNotFoundError, OSError, ...
        raise UserError(f"{uri}: cannot open the Delta table: {error}") from error
    for batch in table.to_pyarrow_dataset().to_batches():
        yield from batch.to_pylist()


def hub_rows(dataset: str, split: str) -> Iterator[dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset, split=split)
    except (ConnectionError, TimeoutError) as error:
        if datasets.config.HF_HUB_OFFLINE:  # offline and not in the local cache: no retry helps
            raise UserError(f"{dataset}/{split}: not in the local datasets cache and the hub is "
                            f"off (HF_HUB_OFFLINE)") from error
        raise TransientError(f"{dataset}/{split}: cannot reach the Hugging Face hub: {error}") from error
    except Exception as error:  # DatasetNotFoundError, unknown split, ... : the name is wrong
        raise UserError(f"{dataset}/{split}: cannot load the Hugging Face dataset: {error}") from error
    yield from loaded


# --- entry point -------------------------------------------------------------------------------

def read_records(uri: str, task: TaskType) -> Iterator[Record]:
    """All raw records of a data path, in a stable order (see the module doc for detection)."""
    local = "://" not in uri
    hub = hub_dataset_name(uri) if local and not os.path.exists(uri) else None
    if hub:
        return row_records(f"{hub[0]}/{hub[1]}", hub_rows(*hub))
    tree = file_tree(uri)
    if not tree.fs.exists(tree.root):
        raise UserError(f"{uri}: no such file or folder")
    if tree.fs.isdir(tree.root) and tree.fs.exists(posixpath.join(tree.root, DELTA_LOG)):
        return row_records(uri, delta_rows(uri))
    return file_records(tree, task)
