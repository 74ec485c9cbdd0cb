"""`positions_in_range` must name exactly the entries torch's CPU sort puts in a range of positions,
and `smallest_positions` those torch's CPU topk returns.

Neither is stable, so the reference is torch itself, on inputs with many ties: both
sides of the 16-element insertion runs, sizes from 1 to millions, and an input built to drive the
quicksort past its depth limit into libstdc++'s heapsort.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergewise.methods.sort_order import RUN, keep_by_rank, positions_in_range, smallest_positions

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="torch's CPU sort is libstdc++'s std::sort on Linux builds only"
)

# 3000 distinct keys chosen, comparison by comparison, against libstdc++'s median-of-three pivots
# (McIlroy's adversary): sorting them (or them halved or quartered, which adds ties) reaches the
# depth limit and heapsorts a range.
ADVERSARY = Path(__file__).parent / "data" / "median_of_three_adversary.npy"


def selected(keys: np.ndarray, start: int, stop: int) -> np.ndarray:
    bits = positions_in_range(keys.copy(), start, stop)
    return np.unpackbits(bits, bitorder="little")[: keys.size].astype(bool)


def torch_selected(keys: np.ndarray, start: int, stop: int) -> np.ndarray:
    mask = np.zeros(keys.size, dtype=bool)
    mask[torch.sort(torch.from_numpy(keys).float()).indices[start:stop].numpy()] = True
    return mask


@pytest.mark.parametrize("size", [1, 2, RUN, RUN + 1, 100, 5_000, 70_001])
@pytest.mark.parametrize("distinct", [1, 3, 50, 1_000_000])
def test_every_cut_matches_torch_sort(size, distinct):
    keys = np.random.default_rng(size + distinct).integers(0, distinct, size).astype(np.int32)
    for start, stop in ((0, max(1, size // 2)), (size // 3, size // 3 + size // 2), (size - 1, size), (0, size)):
        assert np.array_equal(selected(keys, start, stop), torch_selected(keys, start, stop))


def test_a_million_bf16_magnitudes_match_torch_sort():
    generator = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(1 << 20, generator=generator)).bfloat16()
    delta = (base.float() + 0.0002 * torch.randn(1 << 20, generator=generator)).bfloat16() - base
    keys = delta.abs().view(torch.int16).numpy()
    for start, stop in ((0, 1 << 19), (1 << 18, 3 << 18)):
        assert np.array_equal(selected(keys, start, stop), torch_selected(keys, start, stop))


@pytest.mark.parametrize("divisor", [1, 2, 4])
def test_heapsorted_ranges_match_torch_sort_at_every_position(divisor):
    keys = np.load(ADVERSARY).astype(np.int32) // divisor
    full_order = torch.sort(torch.from_numpy(keys).float()).indices.numpy()
    for position in range(0, keys.size, 7):
        assert selected(keys, position, position + 1)[full_order[position]]


def test_sorted_and_constant_inputs_match_torch_sort():
    for keys in (np.arange(100_000), np.arange(100_000)[::-1].copy(), np.zeros(100_000), np.arange(100_000) % 7):
        keys = keys.astype(np.int32)
        assert np.array_equal(selected(keys, 1_000, 60_000), torch_selected(keys, 1_000, 60_000))


def test_tensors_past_four_billion_entries_take_signed_positions_with_the_same_result():
    """Real tensors stay below the switch to int64 positions (and int64 order past 2^31 entries); the
    large side is the same algorithm, checked here by moving the switch."""
    keys = np.random.default_rng(7).integers(0, 300, 70_001).astype(np.int32)
    expected = torch_selected(keys, 20_000, 50_000)
    bits = positions_in_range(keys.copy(), 20_000, 50_000, np.empty(keys.size, dtype=np.int64), unsigned_below=0)
    assert np.array_equal(np.unpackbits(bits, bitorder="little")[: keys.size].astype(bool), expected)


def topk_selected(keys: np.ndarray, count: int) -> np.ndarray:
    mask = np.zeros(keys.size, dtype=bool)
    mask[torch.topk(torch.from_numpy(keys).float(), count, largest=False).indices.numpy()] = True
    return mask


def smallest_selected(keys: np.ndarray, count: int) -> np.ndarray:
    return np.unpackbits(smallest_positions(keys.copy(), count), bitorder="little")[: keys.size].astype(bool)


@pytest.mark.parametrize("size", [1, 3, 4, 100, 5_000, 70_001])
@pytest.mark.parametrize("distinct", [1, 3, 50, 1_000_000])
def test_smallest_positions_match_torch_topk_on_both_sides_of_its_partial_sort_switch(size, distinct):
    """topk heap-selects when count · 64 ≤ size and runs nth_element otherwise."""
    keys = np.random.default_rng(size * distinct).integers(0, distinct, size).astype(np.int32)
    for count in {1, max(1, size // 64), min(size, size // 64 + 1), max(1, size // 2), size}:
        assert np.array_equal(smallest_selected(keys, count), topk_selected(keys, count))


@pytest.mark.parametrize("divisor", [1, 2, 4])
def test_smallest_positions_past_nth_elements_depth_limit_match_torch_topk(divisor):
    """The adversary drives nth_element's quickselect to its depth limit and heap selection."""
    keys = np.load(ADVERSARY).astype(np.int32) // divisor
    for count in range(keys.size // 64 + 1, keys.size, 37):
        assert np.array_equal(smallest_selected(keys, count), topk_selected(keys, count))


def test_no_positions_for_a_count_of_zero():
    assert not smallest_selected(np.arange(10, dtype=np.int32), 0).any()


@pytest.mark.parametrize("dtype, high", [(np.int16, 3), (np.int16, 0x7F81), (np.int32, 2**31 - 1), (np.int64, 2**62)])
@pytest.mark.parametrize("width", [1, 2, 255, 1_031])
def test_keep_by_rank_ranks_equal_keys_in_order_of_position(dtype, high, width):
    """The radix sort against numpy's stable sort: each entry's rank picks its threshold."""
    generator = np.random.default_rng(width)
    keys = generator.integers(0, high, (9, width)).astype(dtype)
    keys[0] = keys[0, 0]  # a row of one key: every byte shared, every pass skipped
    draws = generator.random((9, width), dtype=np.float32)
    by_rank = np.linspace(0.1, 0.9, width).astype(np.float32)
    expected = np.empty(keys.shape, dtype=bool)
    np.put_along_axis(expected, np.argsort(keys, axis=1, kind="stable"), draws < by_rank, axis=1)
    assert np.array_equal(keep_by_rank(keys, draws, by_rank), expected)
