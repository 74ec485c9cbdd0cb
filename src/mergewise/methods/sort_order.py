"""Which entries torch's CPU sort (or topk) puts in a range of positions, ties included, in linear time.

mergekit keeps a task vector's top-k magnitudes with `torch.argsort`. On the CPU that is libstdc++'s
`std::sort` (an introsort: median-of-three quicksort, heapsort past a depth limit, a final insertion
sort of runs of at most 16), which is not stable: which of many equal magnitudes land before the
cut depends on every value in the tensor. Task vectors of bf16 models are differences of bf16
numbers, so a large share of them tie at the cut, and keeping exactly mergekit's entries means
following the same algorithm.

Only the partitions that contain a cut matter: elements never cross a partition boundary, and the
final insertion sort is stable inside each run. So the quicksort is followed down the branches
holding a cut only (a quickselect), and each run or heap-sorted range holding a cut is finished
exactly as libstdc++ finishes it. SCE's top-k variances come from `torch.topk`, libstdc++'s
`nth_element` or `partial_sort` on the CPU, which `smallest_positions` follows the same way. The
tests check the results against `torch.argsort` and `torch.topk` themselves.
"""

from __future__ import annotations

import numpy as np
from numba import njit

RUN = 16  # libstdc++'s _S_threshold: ranges this short are left to the final insertion sort


@njit(inline="always")
def _swap(keys, order, i, j):
    keys[i], keys[j] = keys[j], keys[i]
    order[i], order[j] = order[j], order[i]


@njit(inline="always")
def _move_median_to_first(keys, order, result, a, b, c):
    """libstdc++'s __move_median_to_first: the same comparisons, so the same pick among ties."""
    if keys[a] < keys[b]:
        median = b if keys[b] < keys[c] else (c if keys[a] < keys[c] else a)
    else:
        median = a if keys[a] < keys[c] else (c if keys[b] < keys[c] else b)
    _swap(keys, order, result, median)


BLOCK = 128  # positions scanned at a time by the branch-free phase of a partition
# Unsigned positions spare every indexing through them numba's negative-index check (~2× faster
# swaps); uint32 and int64 mix into int64 where the partition computes with them.
UNSIGNED_POSITIONS_BELOW = 2**32  # entries; larger selections index with int64


@njit
def _partition_around_median(keys, order, first, last, left, right):
    """libstdc++'s __unguarded_partition_pivot: the boundary between the two sides.

    Its Hoare loop swaps the t-th element from the left that is not below the pivot with the t-th
    from the right that is not above it, until they cross. Far from the crossing, those elements are
    found BLOCK positions at a time without branches (`left`, `right` hold their positions) and
    swapped pairwise in the same order; the plain loop then takes over from the last swap, in the
    state it would have reached itself. Random data mispredicts half the branches of the plain loop.
    """
    _move_median_to_first(keys, order, first, first + 1, first + (last - first) // 2, last - 1)
    pivot = keys[first]
    low = first + 1
    high = last
    left_scan = low
    right_scan = high
    found_left = used_left = found_right = used_right = 0
    while right_scan - left_scan >= 2 * BLOCK:
        if used_left == found_left:
            found_left = used_left = 0
            for offset in range(BLOCK):
                left[found_left] = left_scan + offset
                found_left += keys[left_scan + offset] >= pivot
            left_scan += BLOCK
        if used_right == found_right:
            found_right = used_right = 0
            for offset in range(BLOCK):
                right[found_right] = right_scan - 1 - offset
                found_right += keys[right_scan - 1 - offset] <= pivot
            right_scan -= BLOCK
        pairs = min(found_left - used_left, found_right - used_right)
        for pair in range(pairs):
            _swap(keys, order, left[used_left + pair], right[used_right + pair])
        if pairs:
            used_left += pairs
            used_right += pairs
            low = left[used_left - 1] + 1
            high = right[used_right - 1]
    while True:
        while keys[low] < pivot:
            low += 1
        high -= 1
        while pivot < keys[high]:
            high -= 1
        if not low < high:
            return low
        _swap(keys, order, low, high)
        low += 1


@njit
def _insertion_sort(keys, order, first, last):
    """Stable, as the final insertion sort is inside one run."""
    for i in range(first + 1, last):
        key = keys[i]
        index = order[i]
        j = i
        while j > first and key < keys[j - 1]:
            keys[j] = keys[j - 1]
            order[j] = order[j - 1]
            j -= 1
        keys[j] = key
        order[j] = index


@njit
def _adjust_heap(keys, order, first, hole, length, key, index):
    """libstdc++'s __adjust_heap followed by __push_heap, on the heap at `first`."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if keys[first + child] < keys[first + child - 1]:
            child -= 1
        keys[first + hole] = keys[first + child]
        order[first + hole] = order[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        keys[first + hole] = keys[first + child - 1]
        order[first + hole] = order[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and keys[first + parent] < key:
        keys[first + hole] = keys[first + parent]
        order[first + hole] = order[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    keys[first + hole] = key
    order[first + hole] = index


@njit
def _make_heap(keys, order, first, last):
    """libstdc++'s __make_heap."""
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(keys, order, first, parent, length, keys[first + parent], order[first + parent])
        if parent == 0:
            break
        parent -= 1


@njit
def _heap_sort(keys, order, first, last):
    """libstdc++'s __partial_sort(first, last, last): make_heap, then sort_heap."""
    _make_heap(keys, order, first, last)
    length = last - first
    while length > 1:
        length -= 1
        key = keys[first + length]
        index = order[first + length]
        keys[first + length] = keys[first]
        order[first + length] = order[first]
        _adjust_heap(keys, order, first, 0, length, key, index)


@njit
def _heap_select(keys, order, first, middle, last):
    """libstdc++'s __heap_select: [first, middle) ends up holding the smallest keys, as a heap; a key
    enters only if it is below the heap's top, so ties with the top stay out."""
    _make_heap(keys, order, first, middle)
    for position in range(middle, last):
        if keys[position] < keys[first]:
            key = keys[position]
            index = order[position]
            keys[position] = keys[first]
            order[position] = order[first]
            _adjust_heap(keys, order, first, 0, middle - first, key, index)


@njit
def _depth_limit(size):
    """libstdc++'s 2 · ⌊log2 size⌋: partitions allowed before a range is heap-sorted or heap-selected."""
    depth = 0
    while (size >> (depth + 1)) > 0:
        depth += 1
    return 2 * depth


@njit
def _holds_cut(first, last, cuts):
    for cut in cuts:
        if first < cut < last:
            return True
    return False


@njit(cache=True, nogil=True)
def _order_around_cuts(keys, order, cuts, left, right):
    size = keys.shape[0]
    for index in range(size):
        order[index] = index
    pending = [(0, size, _depth_limit(size))]
    while len(pending) > 0:
        first, last, depth = pending.pop()
        if not _holds_cut(first, last, cuts):
            continue
        if last - first <= RUN:
            _insertion_sort(keys, order, first, last)
        elif depth == 0:
            _heap_sort(keys, order, first, last)
        else:
            boundary = _partition_around_median(keys, order, first, last, left, right)
            pending.append((boundary, last, depth - 1))
            pending.append((first, boundary, depth - 1))


@njit(cache=True, nogil=True)
def _select_smallest(keys, order, count, left, right):
    """torch's CPU topk: libstdc++'s std::partial_sort (a heap selection) when count · 64 ≤ size,
    else its std::nth_element at count − 1 (__introselect: quickselect with the sort's partition down
    to ranges of at most 3, finished by insertion sort, or by a heap selection past the depth limit)."""
    size = keys.shape[0]
    for index in range(size):
        order[index] = index
    if count * 64 <= size:
        _heap_select(keys, order, 0, count, size)
        return
    nth = count - 1
    depth = _depth_limit(size)
    first = 0
    last = size
    while last - first > 3:
        if depth == 0:
            _heap_select(keys, order, first, nth + 1, last)
            return
        depth -= 1
        boundary = _partition_around_median(keys, order, first, last, left, right)
        if boundary <= nth:
            first = boundary
        else:
            last = boundary
    _insertion_sort(keys, order, first, last)


@njit(cache=True, nogil=True)
def _mark(order, start, stop, bits):
    for position in range(start, stop):
        index = order[position]
        bits[index >> 3] |= np.uint8(1 << (index & 7))


def _scratch(size: int, order: np.ndarray | None, unsigned_below: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The permutation's memory (`order`, or new) cut to `size`, and the partition's two position
    buffers: unsigned below `unsigned_below` entries."""
    if order is None:
        order = np.empty(size, dtype=np.int32 if size < 2**31 else np.int64)
    order = order[:size]
    positions = np.uint32 if size < unsigned_below else np.int64
    return order, np.empty(BLOCK, dtype=positions), np.empty(BLOCK, dtype=positions)


def positions_in_range(
    keys: np.ndarray,
    start: int,
    stop: int,
    order: np.ndarray | None = None,
    *,
    unsigned_below: int = UNSIGNED_POSITIONS_BELOW,
) -> np.ndarray:
    """The indices `torch.sort(keys).indices[start:stop]` holds on the CPU, as packed bits (one per
    key, little-endian within a byte); `keys` are integers ordered as the values (consumed). `order`
    is scratch memory for the permutation (int32 or int64, at least as long as `keys`); it and the
    kernels, which release the GIL, let callers reuse memory and select on other threads. Fewer
    than `unsigned_below` keys are indexed with unsigned positions."""
    size = keys.shape[0]
    order, left, right = _scratch(size, order, unsigned_below)
    _order_around_cuts(keys, order, np.array([start, stop], dtype=np.int64), left, right)
    bits = np.zeros((size + 7) // 8, dtype=np.uint8)
    _mark(order, start, stop, bits)
    return bits


def smallest_positions(keys: np.ndarray, count: int, order: np.ndarray | None = None) -> np.ndarray:
    """The indices `torch.topk(values, count, largest=False)` returns on the CPU for keys ordered as
    the values (consumed), as packed bits like `positions_in_range`'s: the same libstdc++ selection,
    so the same pick among keys tied at the cut (ties are common in bf16 values)."""
    size = keys.shape[0]
    bits = np.zeros((size + 7) // 8, dtype=np.uint8)
    if count <= 0:
        return bits
    order, left, right = _scratch(size, order, UNSIGNED_POSITIONS_BELOW)
    _select_smallest(keys, order, count, left, right)
    _mark(order, 0, count, bits)
    return bits


@njit(cache=True, nogil=True)
def _keep_by_rank(keys, draws, by_rank, keep):
    """Row by row: rank the non-negative integer keys, equal keys in order of position (an LSD radix
    sort, one byte per pass, the histograms of every byte counted in one pass and bytes every key
    shares skipped), and keep the entry of rank j when its draw is below `by_rank[j]`, as the last
    pass places it."""
    height, width = keys.shape
    digits = keys.itemsize
    order = np.empty(width, np.int64)
    spare = np.empty(width, np.int64)
    counts = np.empty((digits, 256), np.int64)
    telling = np.empty(digits, np.bool_)  # bytes that tell this row's keys apart
    for row in range(height):
        row_keys = keys[row]
        row_draws = draws[row]
        row_keep = keep[row]
        counts[:] = 0
        for position in range(width):
            key = row_keys[position]
            for byte in range(digits):
                counts[byte, (key >> (8 * byte)) & 255] += 1
        last = -1
        for byte in range(digits):
            telling[byte] = counts[byte].max() < width
            if telling[byte]:
                last = byte
                total = 0
                for digit in range(256):
                    total, counts[byte, digit] = total + counts[byte, digit], total
        for position in range(width):
            order[position] = position
        for byte in range(digits):
            if not telling[byte] or byte == last:
                continue
            shift = 8 * byte
            for position in range(width):
                index = order[position]
                digit = (row_keys[index] >> shift) & 255
                spare[counts[byte, digit]] = index
                counts[byte, digit] += 1
            order, spare = spare, order
        if last < 0:  # one key throughout: ranks in order of position
            for rank in range(width):
                row_keep[rank] = row_draws[rank] < by_rank[rank]
            continue
        shift = 8 * last
        for position in range(width):
            index = order[position]
            digit = (row_keys[index] >> shift) & 255
            rank = counts[last, digit]
            counts[last, digit] = rank + 1
            row_keep[index] = row_draws[rank] < by_rank[rank]


def keep_by_rank(keys: np.ndarray, draws: np.ndarray, by_rank: np.ndarray) -> np.ndarray:
    """Which entries of each row of `keys` (non-negative integers, rows × width) are kept, when the
    entry of rank j in its row (equal keys ranked by position) is kept with its draw below
    `by_rank[j]`; `draws` are one per entry, taken in rank order."""
    keep = np.empty(keys.shape, dtype=np.bool_)
    _keep_by_rank(keys, draws, by_rank, keep)
    return keep


def warm_up() -> None:
    """Load (or, the first time, compile) the selections for the keys merges use: 16-bit floats'
    keys, float32's and, for SCE's float64 variances and DELLA's ranks, float64's."""
    for key_type in (np.int16, np.int32, np.int64):
        keys = np.arange(8, dtype=key_type)
        if key_type is not np.int64:
            positions_in_range(keys.copy(), 2, 5)
        smallest_positions(keys.copy(), 4)
        keep_by_rank(keys.reshape(2, 4), np.zeros((2, 4), dtype=np.float32), np.ones(4, dtype=np.float32))
