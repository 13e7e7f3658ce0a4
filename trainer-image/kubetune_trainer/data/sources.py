"""Where records come from: files and folders (local or any fsspec URI), Delta tables and
Hugging Face datasets. Every reader yields the records in a stable order, in chunks that know
each record's location (`record_chunks`; `read_records` for the records one by one).

Detection, in order:
1. a folder (local or fsspec) holding `_delta_log` is a Delta table;
2. any other existing folder or file is read as files (JSONL, or `.txt` for pre-training);
3. a missing path without a scheme shaped `name/split` or `org/name/split` (the last part has no
   dot, so it is not a file name) is a Hugging Face dataset loaded with `datasets`;
4. anything else is a missing path: a UserError naming it.

Files are read in blocks, never a line or file whole before its size is known: a JSONL line or
`.txt` file over `max_record_bytes` is a record problem, not loaded. A UTF-8 BOM at the start of
a file is skipped, as most tools do (editors on Windows write one; it carries no data).
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any, Iterable, Iterator

from ..config import DEFAULT_MAX_RECORD_BYTES, TaskType
from ..errors import TransientError, UserError
from .hub import cache_folder, offline_reason, relative_note
from .records import Location, Record, Unreadable

log = logging.getLogger(__name__)
DELTA_LOG = "_delta_log"
HUB_PART = re.compile(r"^[\w.\-]+$")
HUB_SPLIT = re.compile(r"^[\w\-\[\]:%+]+$")  # train, test, train[:10%]


@dataclass(frozen=True)
class FileTree:
    """An fsspec filesystem and a root inside it, with the user's spelling for messages."""

    fs: Any
    root: str
    uri: str
    local: bool = False  # a local filesystem: files are opened without fsspec (5x less per file)

    def display(self, path: str) -> str:
        """A file's name as the user would write it: their spelling of the root + the rest."""
        rest = relative(path, self.root)
        return self.uri if rest == "." else f"{self.uri.rstrip('/')}/{rest}"

    def files(self, suffix: str) -> list[str]:
        """Files under the root ending in `suffix`, recursive, sorted, hidden ones skipped."""
        if not self.fs.isdir(self.root):
            return [self.root]
        found = local_files(self.root) if self.local else self.fs.find(self.root)
        return sorted(path for path in found if path.endswith(suffix) and not hidden(path, self.root))

    def text_bytes(self, path: str, limit: int) -> Any:
        """A text file's bytes, or Unreadable: over `limit` bytes (then not read) or not readable."""
        try:
            if self.local:
                return local_bytes(path, limit)
            size = self.fs.size(path)
            if size is not None and size > limit:
                return too_big("file", size, limit)
            with self.fs.open(path, "rb") as handle:
                return handle.read()
        except OSError as error:
            return unreadable(error)


def local_bytes(path: str, limit: int) -> Any:
    """A local file's bytes, or Unreadable when over `limit`: sized on the open file, then read
    in one call that also meets the end (half the system calls and objects of `open`: a
    pre-training set is many small files)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(handle).st_size
        if size > limit:
            return too_big("file", size, limit)
        data = os.read(handle, size + 1)
        if len(data) <= size:  # the end: nothing more (the common case)
            return data
        parts = [data]  # it grew since: read on to the end, as a plain read would
        while part := os.read(handle, BLOCK):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(handle)


def local_files(root: str) -> list[str]:
    """What fsspec's `find` lists under a local folder, without its stat and dict per file (9x
    faster on 50,000 files): all but folders, recursively, links listed but not followed, an
    unreadable folder skipped."""
    found, folders = [], [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    (folders if entry.is_dir(follow_symlinks=False) else found).append(f"{folder}/{entry.name}")
        except OSError:
            continue
    return found


def relative(path: str, root: str) -> str:
    """`path` relative to `root`; a plain cut for the paths a listing of the root gives."""
    if path.startswith(root) and path[len(root):len(root) + 1] == "/" and not root.endswith("/"):
        return path[len(root) + 1:]
    return posixpath.relpath(path, root)


def hidden(path: str, root: str) -> bool:
    """A part of the path below `root` starts with a dot (string tests: 50,000 files are listed)."""
    rest = relative(path, root)
    return rest.startswith(".") or "/." in rest


def file_tree(uri: str) -> FileTree:
    import fsspec

    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(uri)
    return FileTree(fs, root, uri, isinstance(fs, LocalFileSystem))


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

BLOCK = 1 << 20  # bytes read at a time: lines are split from blocks, never read whole first
MAX_JSON_DEPTH = 500  # deeper nesting is no training record; it would exhaust the parser's stack


def too_big(what: str, size: int, limit: int) -> Unreadable:
    return Unreadable(f"{what} is {size:,} bytes, over the limit of {limit:,} bytes per record; "
                      f"it is not read (split it, or raise dataPrep.maxRecordBytes)")


def jsonl_value(line: bytes) -> Any:
    """A JSONL line's value, or Unreadable with the rule it breaks (bad UTF-8, bad JSON)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return Unreadable(f"line is not valid UTF-8 (byte 0x{line[error.start]:02x} at byte {error.start + 1}); "
                          f"save the file as UTF-8")
    try:
        return json.loads(text.rstrip())  # columns as an editor counts them, trailing space aside
    except json.JSONDecodeError as error:
        hint = ("; a JSON array? JSONL needs one object per line (jq -c '.[]' FILE.json > FILE.jsonl)"
                if text.lstrip().startswith("[") else "")
        return Unreadable(f"invalid JSON: {error.msg} (column {error.colno}){hint}")
    except RecursionError:
        return Unreadable(f"JSON nested too deeply to read (over {MAX_JSON_DEPTH} levels)")


def split_lines(handle: Any, limit: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, bytes without the newline) per line; a line over `limit` bytes gives its
    size instead, and is skipped without being held in memory."""
    number, head, size = 0, b"", 0
    while block := handle.read(BLOCK):
        *ended, rest = block.split(b"\n")
        for piece in ended:
            number += 1
            size += len(piece)
            yield number, head + piece if size <= limit else size
            head, size = b"", 0
        size += len(rest)
        head = head + rest if size <= limit else b""
    if size:  # a last line without a newline
        yield number + 1, head if size <= limit else size


def unreadable(error: OSError) -> Unreadable:
    return Unreadable(f"cannot read the file: {error.strerror or type(error).__name__}")


def jsonl_lines(tree: FileTree, path: str, limit: int) -> Iterator[tuple[int | None, bytes | Unreadable]]:
    """The file's non-blank lines, (line number, bytes not decoded yet), or Unreadable in place
    of a line over the limit, or of the rest of a file that cannot be read (line number None)."""
    try:
        with tree.fs.open(path, "rb") as handle:
            for number, line in split_lines(handle, limit):
                if isinstance(line, int):
                    yield number, too_big("line", line, limit)
                    continue
                if number == 1 and line.startswith(codecs.BOM_UTF8):  # editors on Windows write one
                    line = line[len(codecs.BOM_UTF8):]
                if line.strip():  # blank lines (a trailing newline, spacing) are not records
                    yield number, line
    except OSError as error:
        yield None, unreadable(error)


def text_value(raw: bytes) -> Any:
    try:
        return raw.decode("utf-8-sig")  # a BOM is no part of the text
    except UnicodeDecodeError as error:
        return Unreadable(f"file is not valid UTF-8 text (byte 0x{raw[error.start]:02x} at byte "
                          f"{error.start + 1}); save it as UTF-8")


def data_files(tree: FileTree, task: TaskType) -> list[str]:
    suffix = ".txt" if task == TaskType.CONTINUED_PRETRAIN else ".jsonl"
    files = tree.files(suffix)
    if not files:
        others = [tree.display(path) for path in tree.files("")][:3]
        found = f"it has {', '.join(others)}{' ...' if len(others) == 3 else ''}" if others else "it is empty"
        what = "one .txt file per document" if suffix == ".txt" else "JSONL files"
        raise UserError(f"{tree.uri}: no {suffix} files in this folder ({found}); {task.value} "
                        f"reads {what}, recursively")
    return files


# --- chunks: records in batches, as they travel to the worker that validates them ------------

class Chunk:
    """A batch of consecutive records, compact (no object per record) and not decoded yet; text
    files are not even read: the worker that validates the chunk reads and decodes it."""

    def __len__(self) -> int:
        raise NotImplementedError

    def values(self) -> Iterator[Any]:
        """Each record's value, read and decoded; Unreadable where it cannot be."""
        raise NotImplementedError

    def location(self, position: int) -> Location:
        raise NotImplementedError

    def records(self) -> Iterator[Record]:
        return (Record(self.location(position), value) for position, value in enumerate(self.values()))


@dataclass
class JsonLines(Chunk):
    names: list[str] = field(default_factory=list)  # each line's file, as the user spells it
    numbers: list[int | None] = field(default_factory=list)
    lines: list[Any] = field(default_factory=list)  # bytes, or Unreadable

    def __len__(self) -> int:
        return len(self.lines)

    def values(self) -> Iterator[Any]:
        return (line if isinstance(line, Unreadable) else jsonl_value(line) for line in self.lines)

    def location(self, position: int) -> Location:
        return Location(self.names[position], self.numbers[position])


@dataclass
class TextFiles(Chunk):
    tree: FileTree
    paths: list[str]
    limit: int

    def __len__(self) -> int:
        return len(self.paths)

    def values(self) -> Iterator[Any]:
        for path in self.paths:
            raw = self.tree.text_bytes(path, self.limit)
            yield raw if isinstance(raw, Unreadable) else text_value(raw)

    def location(self, position: int) -> Location:
        return Location(self.tree.display(self.paths[position]))


@dataclass
class Rows(Chunk):
    source: str
    first: int  # the first row's number
    rows: list[Any]

    def __len__(self) -> int:
        return len(self.rows)

    def values(self) -> Iterator[Any]:
        return iter(self.rows)

    def location(self, position: int) -> Location:
        return Location(self.source, self.first + position)


def jsonl_chunks(tree: FileTree, files: list[str], limit: int, size: int) -> Iterator[JsonLines]:
    chunk = JsonLines()
    for path in files:
        name = tree.display(path)
        for number, line in jsonl_lines(tree, path, limit):
            chunk.names.append(name)
            chunk.numbers.append(number)
            chunk.lines.append(line)
            if len(chunk.lines) == size:
                yield chunk
                chunk = JsonLines()
    if chunk.lines:
        yield chunk


def text_chunks(tree: FileTree, files: list[str], limit: int, size: int) -> Iterator[TextFiles]:
    for first in range(0, len(files), size):
        yield TextFiles(tree, files[first:first + size], limit)


def row_chunks(name: str, rows: Iterable[dict], size: int) -> Iterator[Rows]:
    rows = iter(rows)
    first = 1
    while batch := list(islice(rows, size)):
        yield Rows(name, first, batch)
        first += len(batch)


# --- tables and datasets -----------------------------------------------------------------------

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

    offline = "the hub is off (HF_HUB_OFFLINE=1)" if datasets.config.HF_HUB_OFFLINE else offline_reason()
    try:
        if offline and not datasets.config.HF_HUB_OFFLINE:  # no hub: the local cache alone, no retries
            datasets.config.HF_HUB_OFFLINE = True
            try:
                loaded = datasets.load_dataset(dataset, split=split)
            finally:
                datasets.config.HF_HUB_OFFLINE = False
        else:
            loaded = datasets.load_dataset(dataset, split=split)
    except (ConnectionError, TimeoutError) as error:
        if offline:  # not in the local cache: no retry helps
            raise UserError(f"{dataset}/{split}: no such local folder{relative_note(dataset)}, and not in the "
                            f"local datasets cache ({cache_folder()}) while {offline}: give "
                            f"a path the pods mount, or load it once where the hub is reachable",
                            "DatasetNotFound") from error
        raise TransientError(f"{dataset}/{split}: cannot reach the Hugging Face hub: {error}") from error
    except Exception as error:  # DatasetNotFoundError, unknown split, ... : the name is wrong
        raise UserError(f"{dataset}/{split}: cannot load the Hugging Face dataset: {error}") from error
    yield from loaded


# --- entry point -------------------------------------------------------------------------------

def record_chunks(uri: str, task: TaskType, size: int, limit: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Chunk]:
    """Every record of a data path in a stable order (see the module doc for detection), in
    chunks of `size` records, not read or decoded yet (see `Chunk`): so records another shard
    owns cost next to nothing, and workers read and decode in parallel."""
    local = "://" not in uri
    hub = hub_dataset_name(uri) if local and not os.path.exists(uri) else None
    if hub:
        return row_chunks(f"{hub[0]}/{hub[1]}", hub_rows(*hub), size)
    tree = file_tree(uri)
    if not tree.fs.exists(tree.root):
        raise UserError(f"{uri}: no such file or folder{relative_note(uri)}")
    if local and relative_note(uri):
        log.info("data %s: %s%s", uri, os.path.abspath(uri), relative_note(uri))
    if tree.fs.isdir(tree.root) and tree.fs.exists(posixpath.join(tree.root, DELTA_LOG)):
        return row_chunks(uri, delta_rows(uri), size)
    files = data_files(tree, task)
    if task == TaskType.CONTINUED_PRETRAIN:
        return text_chunks(tree, files, limit, size)
    return jsonl_chunks(tree, files, limit, size)


def read_records(uri: str, task: TaskType, limit: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Record]:
    """All records of a data path, read and decoded."""
    return chain.from_iterable(chunk.records() for chunk in record_chunks(uri, task, 512, limit))
