"""Packing samples into fixed-length sequences. Pure functions, no I/O.

Algorithm: best-fit decreasing. Samples are taken longest first (ties by original index) and
each goes into the open sequence with the least room that still fits it, else a new one. It is
deterministic (same lengths, same packing: a re-run or the `validate` pre-flight gives the same
numbers as the real preparation), it wastes at most ~22% over the optimum in the worst case and
far less in practice, and with rooms bucketed by size it runs in O(n log C). The order it
produces groups similar lengths, which does not matter: the trainer's sampler shuffles sequences.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .store import IGNORE_INDEX, PackedArrays


@dataclass(frozen=True)
class Sample:
    """One tokenized sample: ids and a loss mask of the same length (<= context length)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray  # bool: True where the token is learned

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def pack_compact(lengths: Sequence[int] | np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing over `lengths`; returns (order, bounds): bin b holds the samples
    `order[bounds[b]:bounds[b + 1]]`, bins in creation order, samples in insertion order.
    Flat arrays instead of a list per bin: a few bytes per sample for a large split."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bad = np.flatnonzero((lengths <= 0) | (lengths > capacity))
    if len(bad):
        raise ValueError(f"sample {bad[0]} has length {lengths[bad[0]]}, outside 1..{capacity}")
    by_length = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, ties by index
    sorted_lengths = lengths[by_length]
    firsts = np.flatnonzero(np.diff(sorted_lengths, prepend=0))  # where each run of one length starts
    bins = BestFit(capacity, len(lengths))
    for length, first, last in zip(sorted_lengths[firsts].tolist(), firsts.tolist(),
                                   np.append(firsts[1:], len(lengths)).tolist()):
        bins.place(length, first, last - first)
    order = by_length[np.argsort(bins.bin_of, kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(bins.bin_of, minlength=bins.count))]).astype(np.int64)
    return order, bounds


class BestFit:
    """Best-fit bins, filled a run of equal lengths at a time, with the result of placing its
    samples one by one (each in the bin with the least room that fits it, the longest-waiting of
    those, else a new bin) but in a step per room instead of one per sample (~10x faster).

    Why a room at a time works: within a run of length L, the bin taking a sample is left with
    the least room that still fits the next one as long as its room is >= L, so it takes
    room // L samples in a row; its room then falls below L, where no sample of the run looks.
    The bins of one room thus take room // L samples each, oldest first, before the next room's."""

    def __init__(self, capacity: int, samples: int):
        self.capacity = capacity
        self.bin_of = np.empty(samples, dtype=np.int64)  # per sample, in the order placed
        self.count = 0  # bins opened
        self.rooms: list[int] = []  # sorted distinct free rooms that some bin has
        self.bins_by_room: dict[int, list[int]] = {}  # room -> bin numbers, longest-waiting first

    def place(self, length: int, position: int, samples: int) -> None:
        """Samples `position .. position + samples - 1` (in placing order), all of `length`."""
        moves: list[tuple[int, list[int]]] = []  # (room left, bins), in the order they got there
        slot = bisect.bisect_left(self.rooms, length)
        while samples and slot < len(self.rooms):
            room = self.rooms[slot]
            waiting = self.bins_by_room[room]
            each = room // length
            full = min(len(waiting), samples // each)  # bins that take `each` samples
            rest = samples - full * each if full < len(waiting) else 0  # the next bin's share
            taken = full + (rest > 0)
            position = self.assign(position, waiting[:full], each, rest, waiting[full] if rest else None)
            samples -= full * each + rest
            moves.append((room - each * length, waiting[:full]))
            if rest:
                moves.append((room - rest * length, [waiting[full]]))
            if taken < len(waiting):
                self.bins_by_room[room] = waiting[taken:]
            else:
                del self.bins_by_room[room]
                self.rooms.pop(slot)  # `slot` now names the next larger room
        if samples:  # new bins, each filled until the run's length no longer fits
            each = self.capacity // length
            full, rest = divmod(samples, each)
            new = list(range(self.count, self.count + full + (rest > 0)))
            self.count += len(new)
            self.assign(position, new[:full], each, rest, new[full] if rest else None)
            moves.append((self.capacity - each * length, new[:full]))
            if rest:
                moves.append((self.capacity - rest * length, [new[full]]))
        for room, moved in moves:  # rooms below `length` (or the last bin's): none taken above
            if room and moved:
                if room not in self.bins_by_room:
                    bisect.insort(self.rooms, room)
                    self.bins_by_room[room] = []
                self.bins_by_room[room].extend(moved)

    def assign(self, position: int, bins: list[int], each: int, rest: int, last: int | None) -> int:
        """`each` samples to every bin of `bins`, then `rest` to `last`; the next position."""
        end = position + len(bins) * each
        self.bin_of[position:end] = np.repeat(np.asarray(bins, dtype=np.int64), each)
        if rest:
            self.bin_of[end:end + rest] = last
        return end + rest


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins whose lengths sum to <= capacity (best-fit decreasing).

    Returns the bins in creation order, each listing its sample indices in insertion order.
    """
    order, bounds = pack_compact(lengths, capacity)
    return [order[bounds[b]:bounds[b + 1]].tolist() for b in range(len(bounds) - 1)]


def fill_block(arrays: PackedArrays, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray,
               row_of: np.ndarray) -> None:
    """Lay samples side by side in the rows of `arrays` (pre-filled padding), all at once.

    The samples come flat (sample i is the next `lengths[i]` entries of `ids` and `mask`), row
    by row (`row_of[i]`, sample i's row, never decreases), the ones of a row in order. So the
    tokens fill each row's first slots in the flat order, and each array is filled by one
    boolean-mask assignment (4x faster than scattering to computed indices); a large split has
    millions of samples.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    count = len(lengths)
    if not count:
        return
    starts = np.cumsum(lengths) - lengths  # each sample's first token in the flat arrays
    new_row = np.concatenate([[True], row_of[1:] != row_of[:-1]])
    row_first = np.maximum.accumulate(np.where(new_row, np.arange(count), 0))  # first sample of its row
    filled = np.arange(arrays.context_length) < np.bincount(row_of, lengths, len(arrays))[:, None]
    labels = np.where(mask, ids, np.int32(IGNORE_INDEX))
    labels[starts] = IGNORE_INDEX  # no loss across the boundary with the sample before
    arrays.input_ids[filled] = ids
    arrays.labels[filled] = labels
    arrays.position_ids[filled] = np.arange(len(ids), dtype=np.int32) - np.repeat(starts.astype(np.int32), lengths)
    arrays.sequence_ids[filled] = np.repeat((np.arange(count) - row_first + 1).astype(np.int32), lengths)


def empty_arrays(num_sequences: int, context_length: int, pad_id: int) -> PackedArrays:
    shape = (num_sequences, context_length)
    return PackedArrays(
        input_ids=np.full(shape, pad_id, dtype=np.int32),
        labels=np.full(shape, IGNORE_INDEX, dtype=np.int32),
        position_ids=np.zeros(shape, dtype=np.int32),
        sequence_ids=np.zeros(shape, dtype=np.int32),
    )


def fill_arrays(arrays: PackedArrays, samples: Sequence[Sample], bins: Sequence[Sequence[int]]) -> None:
    """Write every bin as one row of `arrays` (in memory or memory-mapped, pre-filled padding)."""
    members = [samples[index] for members in bins for index in members]
    if not members:
        return
    row_of = np.repeat(np.arange(len(bins)), [len(members) for members in bins])
    fill_block(arrays, np.concatenate([sample.input_ids for sample in members]),
               np.concatenate([sample.loss_mask for sample in members]),
               np.array([len(sample) for sample in members], dtype=np.int64), row_of)


def pack_samples(samples: Sequence[Sample], context_length: int, pad_id: int) -> PackedArrays:
    """Pack into new in-memory arrays (tests and small splits; `prepare` writes block by block)."""
    bins = pack([len(sample) for sample in samples], context_length)
    arrays = empty_arrays(len(bins), context_length, pad_id)
    fill_arrays(arrays, samples, bins)
    return arrays


def packing_efficiency(tokens: int, sequences: int, context_length: int) -> float:
    """Real tokens over all token slots; 0 when there is nothing."""
    return round(tokens / (sequences * context_length), 4) if sequences else 0.0
