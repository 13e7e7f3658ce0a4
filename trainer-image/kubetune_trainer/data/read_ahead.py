"""Reading and checking the first records while the tokenizer loads.

Loading a large tokenizer (Qwen's 151k vocabulary: ~0.9 s) holds the GIL and one CPU while
the others idle, and no record can be tokenized before it is loaded. Reading, decoding and
checking the records needs no tokenizer: so just before the load a forked process does that
for the first chunks, until the parent has loaded (or `MAX_BYTES` are held), and hands
them over as `Checked` chunks, pickled; the workers then only encode them. The same checks run
on the same records, only earlier, so the output is the same. Local files only: a hub dataset
or a table would be opened twice. Anything that goes wrong in the reader is left to the
parent's own reading, which reports it as it would have without a reader.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..config import TaskType
from .records import Location
from .rules import check
from .sources import DELTA_LOG, Chunk, JsonLines

MAX_BYTES = 32 * 2**20  # of checked chunks (pickled) the reader holds at most (~0.9 s of its reading)


@dataclass
class Checked(Chunk):
    """A chunk whose records were read and checked: the examples that held, with their
    positions in the chunk, and the rules broken by the others."""

    source: Chunk  # for the records' locations (its contents dropped where it has them)
    examples: list[Any]
    kept: list[int]
    broken: list[tuple[int, str]]

    def __len__(self) -> int:
        return len(self.kept) + len(self.broken)

    def location(self, position: int) -> Location:
        return self.source.location(position)


def checked(task: TaskType, chunk: Chunk) -> Checked:
    """Read and check every record of `chunk`."""
    examples, kept, broken = [], [], []
    for position, value in enumerate(chunk.values()):
        result = check(task, value)
        if isinstance(result, str):
            broken.append((position, result))
        else:
            examples.append(result)
            kept.append(position)
    source = JsonLines(chunk.names, chunk.numbers, []) if isinstance(chunk, JsonLines) else chunk
    return Checked(source, examples, kept, broken)


@dataclass(frozen=True)
class Pickled:
    """A checked chunk as the reader pickled it: only the worker that encodes it unpickles it."""

    data: bytes

    def load(self) -> Checked:
        return pickle.loads(self.data)


def reads_ahead(uri: str) -> bool:
    """A local file or folder of files (not a Delta table): what the reader may read."""
    return "://" not in uri and os.path.exists(uri) and not os.path.isdir(os.path.join(uri, DELTA_LOG))


class ReadAhead:
    """The forked reader of a split's first chunks; `take` them once the tokenizer is loaded.
    `chunks()`: (chunk number, chunk) for this shard's chunks, as the parent would read them."""

    def __init__(self, task: TaskType, chunks: Callable[[], Iterable[tuple[int, Chunk]]]):
        stop_read, self._stop = os.pipe()
        self._results, results_write = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:  # the reader: never returns
            os.close(self._stop)
            os.close(self._results)
            _read(task, chunks, stop_read, results_write)
        os.close(stop_read)
        os.close(results_write)
        self._taken = False

    def take(self) -> list[tuple[int, Pickled]]:
        """(chunk number, chunk) for the chunks read so far, the first ones of this shard, once
        (then none); the reader stops (a chunk at most later) and is gone when this returns."""
        if self._taken:
            return []
        self._taken = True
        os.close(self._stop)  # the reader sees the end of this pipe: stop
        with os.fdopen(self._results, "rb") as results:
            data = results.read()
        os.waitpid(self._pid, 0)
        try:
            return pickle.loads(data) if data else []
        except Exception:  # a reader that died halfway: the parent reads everything itself
            return []

    def close(self) -> None:
        self.take()


def handed_over(chunks: list[tuple[int, Pickled]]) -> Iterator[tuple[int, Pickled]]:
    """The chunks in order, each dropped from the list as it is handed over (they hold records)."""
    chunks.reverse()
    while chunks:
        yield chunks.pop()


def _read(task: TaskType, chunks: Callable[[], Iterable[tuple[int, Chunk]]], stop: int, out: int) -> None:
    logging.disable(logging.CRITICAL)  # the parent reads these records again later and logs what it sees
    try:
        done: list[tuple[int, Pickled]] = []
        held = 0
        for index, chunk in chunks():
            done.append((index, Pickled(pickle.dumps(checked(task, chunk), protocol=pickle.HIGHEST_PROTOCOL))))
            held += len(done[-1][1].data)
            if held >= MAX_BYTES or select.select([stop], [], [], 0)[0]:
                break
        with os.fdopen(out, "wb") as handle:
            handle.write(pickle.dumps(done, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        os._exit(0)  # a fork: no cleanup of the parent's objects, no atexit handlers
