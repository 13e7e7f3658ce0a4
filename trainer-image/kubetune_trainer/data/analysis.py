"""Read, validate, tokenize and count, a chunk of records at a time.

`analyze` is the `kubetune validate` pre-flight: it streams the records and keeps only each
sample's length (packing needs no more), so it writes nothing; `prepare` runs the same passes
and appends the tokens to a part on disk (see `parts`), so both report identical numbers.

Memory holds a few chunks (CHUNK records each), whatever the size of the data. Chunks go to
worker processes, one per CPU the pod may use, compact and not decoded yet (text files not even
read: see `sources.Chunk`); results come back in chunk order. A shard (one of
`dataPrep.parallelism` pods) takes chunk k when k % shards is its number; every shard walks the
record list, but reads and decodes only its own chunks.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..config import RunConfig, TaskType
from ..errors import UserError
from ..inputs import check_confined, check_custom_weights
from .encoding import Render, chat_renderer, encode_batch, positions
from .modelinfo import check_chat_template, load_tokenizer, model_max_context, resolve_context_length
from .packing import pack_compact, packing_efficiency
from .parts import ChunkResult, Merged, Part, PartWriter, merge
from .read_ahead import Checked, Pickled, ReadAhead, checked, handed_over, reads_ahead
from .records import Location, Problem
from .report import DataStats, PrepFailed, PrepReport, SplitReport
from .sources import Chunk, record_chunks

log = logging.getLogger(__name__)
CHUNK = 512  # records per chunk: the unit of a worker's task, of a shard's share, of memory


@dataclass(frozen=True)
class Encoder:
    """What turns a chunk of records into samples: the same in the parent and in workers."""

    task: TaskType
    tokenizer: Any
    context_length: int
    render: Render | None

    @classmethod
    def load(cls, model: str, task: TaskType, context_length: int, tokenizer: Any = None) -> "Encoder":
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        render = chat_renderer(tokenizer) if task == TaskType.CHAT_COMPLETION else None
        return cls(task, tokenizer, context_length, render)

    def process(self, index: int, chunk: Chunk | Pickled) -> ChunkResult:
        if isinstance(chunk, Pickled):  # read and checked ahead, while the tokenizer loaded
            chunk = chunk.load()
        if not isinstance(chunk, Checked):
            chunk = checked(self.task, chunk)
        encoded = encode_batch(self.tokenizer, chunk.examples, self.render)
        broken = chunk.broken + [(chunk.kept[number], reason) for number, reason in encoded.refusals.items()]
        broken.sort(key=lambda pair: pair[0])
        problems = [Problem(chunk.location(position), rule) for position, rule in broken]
        return self.truncated(index, encoded, lambda number: chunk.location(chunk.kept[number]), problems)

    def truncated(self, index: int, encoded, where: Callable[[int], Location],
                  problems: list[Problem]) -> ChunkResult:
        """Cut every sample to the context length; drop those left with nothing to learn.
        `where(i)`: the location of the batch's example i."""
        lengths = encoded.lengths
        kept_lengths = np.minimum(lengths, self.context_length)
        in_context = positions(lengths) < self.context_length
        mask = encoded.mask[in_context]
        owner = np.repeat(np.arange(len(lengths)), kept_lengths)
        learned = np.bincount(owner, weights=mask, minlength=len(lengths)) > 0
        refused = np.zeros(len(lengths), dtype=bool)
        refused[list(encoded.refusals)] = True
        keep = learned & ~refused
        dropped = [where(int(i)) for i in np.flatnonzero(~learned & ~refused)]
        tokens = np.repeat(keep, kept_lengths)
        return ChunkResult(index, encoded.ids[in_context][tokens], mask[tokens], kept_lengths[keep],
                           problems, int((lengths[keep] > self.context_length).sum()), dropped)


# --- chunks, workers, shards -------------------------------------------------------------------

def own_chunks(chunks: Iterable[Chunk], shard: int, shards: int) -> Iterator[tuple[int, Chunk]]:
    """(chunk number, chunk) for the chunks this shard owns."""
    return ((index, chunk) for index, chunk in enumerate(chunks) if index % shards == shard)


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a pod's limit)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


# A worker's encoder: the parent's, inherited by the fork (loading the tokenizer again would cost
# each worker seconds). Workers tokenize on one thread each: the Rust thread pool, sized to one
# thread, not the library's serial path (TOKENIZERS_PARALLELISM=false), which takes 1.3x the CPU
# for the same tokens here (glibc's malloc: with one arena the pool is as slow; BENCHMARKS.md).
# Should the parent have used the pool already (a small train split before a large eval split),
# the library turns it off in the child, which then takes the serial path.
_worker: Encoder | None = None
POOL_THREADS = "RAYON_NUM_THREADS"  # read when the library first starts its pool


def _start_worker() -> None:
    os.environ[POOL_THREADS] = "1"  # one process per CPU, one pool thread each


def _process_in_worker(index: int, chunk: Chunk) -> ChunkResult:
    assert _worker is not None
    return _worker.process(index, chunk)


def in_order(pool: Executor, function: Callable, items: Iterable[tuple], window: int) -> Iterator:
    """pool.map that keeps at most `window` tasks in flight (Executor.map submits all at once,
    which would hold the whole dataset in memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, *item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def chunk_results(encoder: Encoder, chunks: Iterable[tuple[int, Chunk]],
                  workers: int) -> Iterator[ChunkResult]:
    chunks = iter(chunks)
    head = list(islice(chunks, 2))
    chunks = chain(head, chunks)
    if workers <= 1 or len(head) < 2:  # a small split is done before workers would have started
        yield from (encoder.process(index, chunk) for index, chunk in chunks)
        return
    global _worker
    _worker = encoder
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_start_worker) as pool:
            yield from in_order(pool, _process_in_worker, chunks, 2 * workers)
    finally:
        _worker = None


# --- a split -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    number: int = 0
    count: int = 1


def shard_chunks(config: RunConfig, uri: str, shard: Shard) -> Iterator[tuple[int, Chunk]]:
    return own_chunks(record_chunks(uri, config.task_type, CHUNK, config.max_record_bytes), shard.number, shard.count)


def read_part(config: RunConfig, uri: str, encoder: Encoder, shard: Shard, folder: Path | None,
              processes: int | None = None, ahead: ReadAhead | None = None) -> Part:
    """This shard's chunks of one split: counted, and with a folder written to a part there.
    `processes`: worker processes, by default one per available CPU; `ahead`: the reader of
    the split's first chunks, started before the tokenizer loaded."""
    writer = PartWriter(folder, config.max_reported_errors)
    first = ahead.take() if ahead else []
    rest = rest_of(config, uri, shard, skip=len(first))
    for result in chunk_results(encoder, chain(handed_over(first), rest), processes or available_cpus()):
        writer.add(result)
    return writer.close()


def rest_of(config: RunConfig, uri: str, shard: Shard, skip: int) -> Iterator[tuple[int, Chunk]]:
    """The shard's chunks after its first `skip` (read ahead); listed only once those are sent."""
    yield from islice(shard_chunks(config, uri, shard), skip, None)


def split_report(split: str, uri: str, merged: Merged,
                 context_length: int) -> tuple[SplitReport, tuple[np.ndarray, np.ndarray]]:
    """Pack the merged samples; the report and the bins (see `packing.pack_compact`)."""
    report = SplitReport(split, uri, problems=merged.problems, invalid_records=merged.invalid_records)
    if not len(merged.lengths) and not merged.invalid_records:
        if merged.dropped:
            raise UserError(f"{uri}: no sample has a token to learn within contextLength {context_length} "
                            f"({merged.dropped} dropped, e.g. {merged.dropped_where[0]}); raise contextLength "
                            f"or shorten the prompts")
        raise UserError(f"{uri}: no records found ({split} data)")
    order, bounds = pack_compact(merged.lengths, context_length)
    tokens = int(merged.lengths.sum())
    sequences = len(bounds) - 1
    report.stats = DataStats(len(merged.lengths), tokens, merged.truncated, sequences,
                             packing_efficiency(tokens, sequences, context_length), merged.dropped)
    if merged.dropped:
        log.warning("%s: %d sample(s) dropped, nothing left to learn within contextLength %d (e.g. %s)",
                    uri, merged.dropped, context_length, ", ".join(map(str, merged.dropped_where[:3])))
    report.dropped_where = merged.dropped_where
    return report, (order, bounds)


# --- the whole analysis ------------------------------------------------------------------------

@dataclass
class Setup:
    tokenizer: Any
    context_length: int
    sources: dict[str, str]  # split -> uri
    ahead: ReadAhead | None = None  # the reader of the train split's first chunks (see `read_ahead`)

    def close(self) -> None:
        """Stop the reader if nothing took its chunks (a finished part, a failure)."""
        if self.ahead is not None:
            self.ahead.close()


def setup(config: RunConfig, shard: Shard | None = None) -> Setup:
    check_confined(config)
    if config.validate_inputs:
        check_custom_weights(config.custom_weights_path)
    shard = shard or Shard()
    uri = config.train_data_path
    ahead = ReadAhead(config.task_type, lambda: shard_chunks(config, uri, shard)) if reads_ahead(uri) else None
    try:
        tokenizer = load_tokenizer(config.model)
        check_chat_template(config, tokenizer)
        context_length = resolve_context_length(config.context_length, model_max_context(config.model, tokenizer))
    except BaseException:
        if ahead is not None:
            ahead.close()
        raise
    sources = {"train": uri}
    if config.eval_data_path:
        sources["eval"] = config.eval_data_path
    return Setup(tokenizer, context_length, sources, ahead)


def checked_report(config: RunConfig, context_length: int, splits: dict[str, SplitReport]) -> PrepReport:
    report = PrepReport(context_length, splits["train"], splits.get("eval"), config.max_reported_errors)
    if not report.ok:
        raise PrepFailed(report)
    return report


def analyze(config: RunConfig, processes: int | None = None) -> PrepReport:
    """The pre-flight: validate, tokenize and pack, write nothing; raises PrepFailed (a
    DataValidationFailed) on bad records."""
    ready = setup(config)
    try:
        encoder = Encoder.load(config.model, config.task_type, ready.context_length, ready.tokenizer)
        splits = {}
        for split, uri in ready.sources.items():
            part = read_part(config, uri, encoder, Shard(), None, processes, ready.ahead if split == "train" else None)
            merged = merge([part], config.max_reported_errors)
            splits[split] = split_report(split, uri, merged, ready.context_length)[0]
    finally:
        ready.close()
    return checked_report(config, ready.context_length, splits)
