"""Sparsification primitives for task vectors: which entries of a delta survive, and the rescale.

Magnitude selection is defined on the whole tensor: `select_magnitudes` gathers |delta| chunk by
chunk into integer keys and finds exactly the entries mergekit's sort keeps, ties at the cut
included, as a packed bit mask that any row chunk then reads its part of. Random masks are drawn per
row chunk from generators the engine seeds by (seed, tensor, model, chunk), so a second pass sees
the same mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch


class Sparsification(StrEnum):
    MAGNITUDE = "magnitude"  # TIES: keep the top-k |delta|
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: drop the largest too
    RANDOM = "random"  # DARE: Bernoulli(density)
    RANK_RANDOM = "rank_random"  # DELLA: keep probability grows with rank in the row


def kept_count(numel: int, density: float) -> int:
    """How many entries a top-`density` selection keeps: mergekit's ⌊density·n⌋, at least one."""
    return min(numel, max(1, int(density * numel)))


def magnitude_positions(count: int, density: float, gamma: float | None = None) -> tuple[int, int, bool]:
    """mergekit's kept positions [start, stop) of its sort of |delta|, and whether it sorts descending.

    Without gamma (TIES): the first max(1, ⌊density·n⌋) of a descending sort. With gamma
    (breadcrumbs): ⌊density·n⌋ positions of an ascending sort, ending ⌊gamma·n⌋ before its top (or
    at it, when both shares do not fit).
    """
    if gamma is None:
        return 0, kept_count(count, density), True
    keep = int(density * count)
    start = max(0, count - keep - int(gamma * count))
    return start, start + keep, False


@dataclass(frozen=True)
class KeepBits:
    """Which entries of a flattened tensor survive a magnitude selection: one bit each (little-endian
    within a byte), an eighth of a bool mask, so whole-tensor masks stay small."""

    bits: np.ndarray

    def rows(self, start: int, count: int) -> torch.Tensor:
        """The mask of flat entries [start, start + count) as bools."""
        first = start >> 3
        unpacked = np.unpackbits(self.bits[first : (start + count + 7) >> 3], bitorder="little")
        offset = start - (first << 3)
        return torch.from_numpy(unpacked[offset : offset + count].view(np.bool_))

    def packed_rows(self, first_row: int, like: torch.Tensor) -> tuple[np.ndarray, int]:
        """The bits of the row chunk `like`, which starts at row `first_row`, still packed: the bytes
        holding them and the position of its first entry in those bytes."""
        start = first_row * math.prod(like.shape[1:])
        first = start >> 3
        return self.bits[first : (start + like.numel() + 7) >> 3], start - (first << 3)

    @classmethod
    def of_mask(cls, mask: torch.Tensor) -> KeepBits:
        """The entries a bool mask keeps, in its row-major order."""
        return cls(np.packbits(mask.reshape(-1).cpu().numpy(), bitorder="little"))

    def rows_like(self, first_row: int, like: torch.Tensor) -> torch.Tensor:
        """The mask of the row chunk `like`, which starts at row `first_row`, shaped and placed like it."""
        start = first_row * math.prod(like.shape[1:])
        return self.rows(start, like.numel()).reshape(like.shape).to(like.device)


def magnitude_keys(inputs: torch.Tensor, base: torch.Tensor, descending: bool, out: np.ndarray) -> None:
    """Write |inputs − base| into `out` as integers that sort as mergekit's keys `|delta|.float()`
    sort on the CPU.

    Bit patterns of non-negative floats order as their values; 16-bit floats keep their 16 bits (the
    float32 conversion is exact). Every NaN becomes one key above infinity: torch's comparators
    put NaNs after every number (before, descending) and treat them as equal. Negated for descending.
    bf16 rows on the CPU take one fused pass.
    """
    if bf16_on_cpu(inputs, base):
        from mergewise.methods import bf16_bits  # numba: loaded by the merges that select, not by every merge

        bf16_bits.magnitude_keys(bit_patterns(inputs), bit_patterns(base), descending, out)
        return
    delta = (inputs - base).abs_()
    sort_keys(delta if delta.element_size() == 2 else delta.float(), descending, out)


_INTEGERS_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}
KEY_TYPES = {2: np.int16, 4: np.int32, 8: np.int64}  # `sort_keys` of floats this many bytes wide


def sort_keys(magnitudes: torch.Tensor, descending: bool, out: np.ndarray) -> None:
    """Write non-negative floats into `out` as integers of their width that sort as the floats do on
    the CPU: bit patterns of non-negative floats order as their values, and every NaN becomes one
    key above infinity (torch's comparators put NaNs after every number and treat them as equal)."""
    integer = _INTEGERS_OF_WIDTH[magnitudes.element_size()]
    infinity = int(torch.tensor(math.inf, dtype=magnitudes.dtype).view(integer))
    keys = magnitudes.view(integer).clamp(max=infinity + 1)
    out[:] = (keys.neg_() if descending else keys).reshape(-1).cpu().numpy()


def bf16_on_cpu(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is bf16 in CPU memory: what the numba kernels read."""
    return all(tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu" for tensor in tensors)


def bit_patterns(tensor: torch.Tensor) -> np.ndarray:
    """A 16-bit float tensor's bits, flat, as numpy int16 (a view when it is contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.int16).numpy()


class SelectionScratch:
    """Memory one magnitude selection at a time works in (integer keys and the permutation), kept for
    the next: fresh pages cost ~2 µs each to fault in on some machines, more than selecting them."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def buffer(self, use: str, count: int, dtype: type[np.generic]) -> np.ndarray:
        key = (use, np.dtype(dtype))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < count:
            buffer = self._buffers[key] = np.empty(count, dtype=key[1])
        return buffer[:count]

    def order(self, count: int) -> np.ndarray:
        """Memory for a permutation of `count` entries."""
        return self.buffer("order", count, np.int32 if count < 2**31 else np.int64)


def select_magnitudes(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    count: int,
    density: float,
    gamma: float | None = None,
    scratch: SelectionScratch | None = None,
) -> KeepBits | None:
    """The entries of a task vector, given as consecutive row chunks (input, base) of `count` entries
    in all, that mergekit's magnitude sparsification keeps, ties at the cuts included (None: every
    entry is kept). mergekit sorts the whole |delta| with `torch.argsort`; `positions_in_range` finds
    the same entries in linear time. `scratch` is memory to work in, kept by callers that select again.
    """
    if density >= 1:
        return None
    start, stop, descending = magnitude_positions(count, density, gamma)
    if density <= 0 or count == 0 or stop <= start:
        return KeepBits(np.zeros((count + 7) // 8, dtype=np.uint8))
    scratch = scratch or SelectionScratch()
    keys = None
    filled = 0
    for inputs, base in pairs:
        if keys is None:
            narrow = inputs.dtype in (torch.bfloat16, torch.float16) and base.dtype == inputs.dtype
            keys = scratch.buffer("keys", count, np.int16 if narrow else np.int32)
        magnitude_keys(inputs, base, descending, keys[filled : filled + inputs.numel()])
        filled += inputs.numel()
    order = scratch.order(count)
    from mergewise.methods.sort_order import positions_in_range  # numba, as above

    assert keys is not None  # `count` entries > 0 came in `pairs`

    return KeepBits(positions_in_range(keys, start, stop, order))


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    probabilities = torch.full(delta.shape, density, dtype=torch.float32)
    return torch.bernoulli(probabilities, generator=generator).to(delta.device, torch.bool)


def rank_random_mask(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """DELLA (MagPrune): keep probability rises linearly with the magnitude rank within each row,
    from density − ε for the smallest to density + ε for the largest; equal magnitudes rank in
    order of position. Ranks come from a radix sort of integer keys and draws from a PCG64 stream
    seeded by `generator`: a tenth of the time of torch's two argsorts and its Bernoulli draws."""
    from mergewise.methods.sort_order import keep_by_rank  # numba, as above

    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    height, width = rows.shape
    keys = np.empty(rows.numel(), dtype=KEY_TYPES[rows.element_size()])
    sort_keys(rows.abs(), False, keys)
    step = 2 * epsilon / (width - 1) if width > 1 else 0.0
    by_rank = ((density - epsilon) + step * np.arange(width)).astype(np.float32)
    draws = np.random.Generator(np.random.PCG64(generator.initial_seed())).random((height, width), dtype=np.float32)
    keep = keep_by_rank(keys.reshape(height, width), draws, by_rank)
    return torch.from_numpy(keep).reshape(delta.shape).to(delta.device)


def l1_rescale(total: float, kept: float, eps: float = 1e-7) -> float:
    """Factor restoring the L1 norm of a delta after masking (1 when either norm is ~0)."""
    if total < eps or kept < eps:
        return 1.0
    return total / kept
