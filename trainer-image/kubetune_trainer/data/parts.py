"""A shard's output on disk ("a part"), and the merge of parts into one sample sequence.

A part holds the samples of the chunks its shard owns, in chunk order, flat: `ids.bin` (int32)
and `mask.bin` (uint8) grow a chunk at a time, so memory holds one chunk, never the split.
`part.json` records per chunk how many samples it kept, plus the problems and counts;
`lengths.npy` the length of every sample. Reading back uses `pread`, not memory maps, so a
merge's resident memory stays bounded too (mapped pages would count against the pod).

The merge orders the chunks of all parts by their number: the samples then come in the order
one unsharded pass would produce, so the packed result is the same for any shard count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .records import Location, Problem

PART_FILE = "part.json"
DONE = "_DONE"


@dataclass
class ChunkResult:
    """One chunk of records, validated and encoded: the kept samples (flat) and what was not."""

    index: int  # the chunk's number in the split's record order
    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    problems: list[Problem]
    truncated: int  # kept samples that were cut to the context length
    dropped: list[Location]  # samples left with no token to learn after truncation


@dataclass
class Part:
    """The summary of a part (everything but the tokens)."""

    chunks: list[int] = field(default_factory=list)  # chunk numbers, ascending
    chunk_samples: list[int] = field(default_factory=list)  # samples kept per chunk
    lengths: list[np.ndarray] = field(default_factory=list)  # per chunk
    problems: list[tuple[int, Problem]] = field(default_factory=list)  # (chunk, problem), first `cap`
    invalid_records: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_where: list[tuple[int, Location]] = field(default_factory=list)  # first `cap`
    folder: Path | None = None  # where the tokens are; None: counted only (the pre-flight)

    @property
    def all_lengths(self) -> np.ndarray:
        return np.concatenate(self.lengths).astype(np.int64) if self.lengths else np.zeros(0, np.int64)


class PartWriter:
    """Collects chunk results; with a folder, appends their tokens to the part's files."""

    def __init__(self, folder: Path | None, cap: int):
        self.part = Part(folder=folder)
        self.cap = cap
        self.files = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.files = (open(folder / "ids.bin", "wb"), open(folder / "mask.bin", "wb"))

    def add(self, result: ChunkResult) -> None:
        part = self.part
        part.chunks.append(result.index)
        part.chunk_samples.append(len(result.lengths))
        part.lengths.append(result.lengths.astype(np.int32))
        part.invalid_records += len(result.problems)
        part.problems += [(result.index, p) for p in result.problems[: self.cap - len(part.problems)]]
        part.truncated += result.truncated
        part.dropped += len(result.dropped)
        part.dropped_where += [(result.index, w) for w in result.dropped[: self.cap - len(part.dropped_where)]]
        if self.files:
            self.files[0].write(np.ascontiguousarray(result.ids, dtype=np.int32).tobytes())
            self.files[1].write(np.ascontiguousarray(result.mask, dtype=np.uint8).tobytes())

    def close(self) -> Part:
        if self.files:
            for handle in self.files:
                handle.close()
            save_part(self.part)
        return self.part


def location_json(location: Location) -> list:
    return [location.source, location.line]


def save_part(part: Part) -> None:
    assert part.folder is not None
    np.save(part.folder / "lengths.npy", part.all_lengths.astype(np.int32))
    summary = {
        "chunks": part.chunks, "chunk_samples": part.chunk_samples,
        "problems": [[chunk, location_json(p.location), p.rule] for chunk, p in part.problems],
        "invalid_records": part.invalid_records, "truncated": part.truncated, "dropped": part.dropped,
        "dropped_where": [[chunk, location_json(where)] for chunk, where in part.dropped_where],
    }
    (part.folder / PART_FILE).write_text(json.dumps(summary))
    (part.folder / DONE).write_text("")


def is_done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def load_part(folder: Path) -> Part:
    summary = json.loads((folder / PART_FILE).read_text())
    lengths = np.load(folder / "lengths.npy").astype(np.int64)
    bounds = np.cumsum([0] + summary["chunk_samples"])
    return Part(
        chunks=summary["chunks"], chunk_samples=summary["chunk_samples"],
        lengths=[lengths[bounds[i]:bounds[i + 1]] for i in range(len(summary["chunks"]))],
        problems=[(chunk, Problem(Location(*where), rule)) for chunk, where, rule in summary["problems"]],
        invalid_records=summary["invalid_records"], truncated=summary["truncated"], dropped=summary["dropped"],
        dropped_where=[(chunk, Location(*where)) for chunk, where in summary["dropped_where"]],
        folder=folder)


@dataclass
class Merged:
    """All parts as one sequence of samples, in chunk order."""

    parts: list[Part]
    lengths: np.ndarray  # every sample, in order
    part_of: np.ndarray  # which part holds sample i
    offset: np.ndarray  # its first token's index in that part's files
    problems: list[Problem]  # the first `cap`, in record order
    invalid_records: int
    truncated: int
    dropped: int
    dropped_where: list[Location]


def merge(parts: list[Part], cap: int) -> Merged:
    pieces = []  # (chunk, part number, first sample in the part, lengths)
    for number, part in enumerate(parts):
        first = 0
        for chunk, lengths in zip(part.chunks, part.lengths):
            pieces.append((chunk, number, first, lengths))
            first += len(lengths)
    pieces.sort(key=lambda piece: piece[0])
    token_starts = [np.concatenate([[0], np.cumsum(part.all_lengths)]) for part in parts]
    lengths = [piece[3] for piece in pieces]
    part_of = [np.full(len(piece[3]), piece[1], dtype=np.int16) for piece in pieces]
    offset = [token_starts[piece[1]][piece[2]:piece[2] + len(piece[3])] for piece in pieces]

    def joined(arrays: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)

    def first(items):
        return [item for _, item in sorted(items, key=lambda pair: pair[0])][:cap]

    return Merged(parts, joined(lengths, np.int64), joined(part_of, np.int16), joined(offset, np.int64),
                  first([pair for part in parts for pair in part.problems]),
                  sum(part.invalid_records for part in parts), sum(part.truncated for part in parts),
                  sum(part.dropped for part in parts), first([pair for part in parts for pair in part.dropped_where]))


class SampleReader:
    """Reads merged samples back from the parts' files with `pread`."""

    def __init__(self, merged: Merged):
        self.merged = merged
        self.handles = [(os.open(part.folder / "ids.bin", os.O_RDONLY), os.open(part.folder / "mask.bin", os.O_RDONLY))
                        for part in merged.parts]

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples `indices`, flat: (ids, mask, lengths)."""
        merged = self.merged
        lengths = merged.lengths[indices]
        ids, masks = [], []
        for part, start, length in zip(merged.part_of[indices].tolist(), merged.offset[indices].tolist(),
                                       lengths.tolist()):
            ids_fd, mask_fd = self.handles[part]
            ids.append(os.pread(ids_fd, 4 * length, 4 * start))
            masks.append(os.pread(mask_fd, length, start))
        return (np.frombuffer(b"".join(ids), dtype=np.int32),
                np.frombuffer(b"".join(masks), dtype=np.uint8).astype(bool), lengths)

    def close(self) -> None:
        for pair in self.handles:
            for handle in pair:
                os.close(handle)
