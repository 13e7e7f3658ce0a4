"""Packing: best-fit decreasing bins, and rows where no sample leaks into another."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_trainer.data.packing import Sample, pack, pack_compact, pack_samples, packing_efficiency
from kubetune_trainer.data.store import IGNORE_INDEX


def test_best_fit_decreasing_fills_the_tightest_bin():
    # 7 opens bin 0 (room 3), the 4s share bin 1 (room 2); the 1 fits both rooms and goes to the
    # tightest, bin 1, where first fit would pick bin 0.
    assert pack([1, 4, 7, 4], 10) == [[2], [1, 3, 0]]


def test_equal_lengths_keep_index_order_and_bins_fill_oldest_first():
    assert pack([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]
    assert pack([], 8) == []


def test_lengths_outside_the_capacity_are_refused():
    with pytest.raises(ValueError, match="sample 1 has length 9"):
        pack([2, 9], 8)
    with pytest.raises(ValueError, match="sample 0 has length 0"):
        pack([0], 8)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64).flatmap(
    lambda capacity: st.tuples(st.just(capacity), st.lists(st.integers(1, capacity), max_size=40))))
def test_every_sample_lands_in_exactly_one_bin_that_fits(case):
    capacity, lengths = case
    bins = pack(lengths, capacity)
    assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in members) <= capacity for members in bins)
    # Best fit leaves at most one bin half full or less, so bins <= 2 * total / capacity + 1.
    loads = [sum(lengths[i] for i in members) for members in bins]
    assert sum(2 * load <= capacity for load in loads) <= 1
    assert pack(lengths, capacity) == bins  # deterministic


def one_by_one(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing as defined, a sample at a time: longest first (ties by index), each
    into the bin with the least room that fits it, the one longest at that room first."""
    bins: list[list[int]] = []
    rooms: dict[int, list[int]] = {}  # room -> bins, in the order they came to it
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fitting = [room for room in rooms if rooms[room] and room >= lengths[index]]
        if fitting:
            number = rooms[min(fitting)].pop(0)
            room = min(fitting)
        else:
            number, room = len(bins), capacity
            bins.append([])
        bins[number].append(index)
        rooms.setdefault(room - lengths[index], []).append(number)
    return bins


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(
    lambda capacity: st.tuples(st.just(capacity), st.lists(st.integers(1, capacity), max_size=80))))
def test_a_run_of_equal_lengths_placed_at_once_packs_as_one_by_one(case):
    capacity, lengths = case
    assert pack(lengths, capacity) == one_by_one(lengths, capacity)


def test_skewed_lengths_pack_as_one_by_one():
    # Runs of equal lengths, rooms several samples fit in, bins left part-filled between runs.
    rng = np.random.default_rng(3)
    for capacity in (64, 512, 2048):
        lengths = np.clip(rng.lognormal(np.log(capacity / 12), 1.0, 3000).astype(int), 1, capacity).tolist()
        order, bounds = pack_compact(lengths, capacity)
        bins = [order[bounds[b]:bounds[b + 1]].tolist() for b in range(len(bounds) - 1)]
        assert bins == one_by_one(lengths, capacity)


def sample(ids, mask):
    return Sample(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))


def test_rows_restart_positions_mask_boundaries_and_pad():
    samples = [sample([10, 11, 12], [0, 1, 1]), sample([20, 21, 22, 23], [1, 1, 1, 1]), sample([30, 31], [0, 1])]
    arrays = pack_samples(samples, context_length=8, pad_id=0)
    # Best fit decreasing: the 4-long sample opens row 0, then 3 and 2 follow until full/padding.
    assert arrays.input_ids.tolist() == [[20, 21, 22, 23, 10, 11, 12, 0], [30, 31, 0, 0, 0, 0, 0, 0]]
    assert arrays.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert arrays.sequence_ids.tolist() == [[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    x = IGNORE_INDEX
    assert arrays.labels.tolist() == [[x, 21, 22, 23, x, 11, 12, x], [x, 31, x, x, x, x, x, x]]
    assert {array.dtype for array in arrays.arrays().values()} == {np.dtype(np.int32)}


def test_first_token_of_a_sample_is_masked_even_when_it_would_be_learned():
    arrays = pack_samples([sample([1, 2], [1, 1]), sample([3, 4], [1, 1])], context_length=4, pad_id=9)
    assert arrays.labels.tolist() == [[IGNORE_INDEX, 2, IGNORE_INDEX, 4]]


def test_packing_efficiency_is_real_tokens_over_slots():
    assert packing_efficiency(tokens=12, sequences=2, context_length=8) == 0.75
    assert packing_efficiency(tokens=0, sequences=0, context_length=8) == 0.0


def rows_one_sample_at_a_time(samples, bins, context_length, pad_id):
    """The definition of the packed rows: each bin's samples written one after another."""
    arrays = {name: np.full((len(bins), context_length), fill, dtype=np.int32) for name, fill in
              (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("position_ids", 0), ("sequence_ids", 0))}
    for row, members in enumerate(bins):
        at = 0
        for number, index in enumerate(members, start=1):
            ids, mask = samples[index].input_ids, samples[index].loss_mask
            end = at + len(ids)
            arrays["input_ids"][row, at:end] = ids
            arrays["labels"][row, at:end] = np.where(mask, ids, IGNORE_INDEX)
            arrays["labels"][row, at] = IGNORE_INDEX
            arrays["position_ids"][row, at:end] = np.arange(len(ids))
            arrays["sequence_ids"][row, at:end] = number
            at = end
    return arrays


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 48).flatmap(lambda capacity: st.tuples(
    st.just(capacity), st.lists(st.integers(1, capacity), max_size=60), st.integers(0, 2**31 - 1))))
def test_rows_filled_at_once_are_the_rows_written_sample_by_sample(case):
    capacity, lengths, seed = case
    rng = np.random.default_rng(seed)
    samples = [sample(rng.integers(0, 1000, length), rng.random(length) < 0.6) for length in lengths]
    arrays = pack_samples(samples, context_length=capacity, pad_id=7)
    expected = rows_one_sample_at_a_time(samples, pack(lengths, capacity), capacity, pad_id=7)
    for name, array in arrays.arrays().items():
        assert array.tolist() == expected[name].tolist(), name
