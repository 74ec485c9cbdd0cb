"""What a residual code is: how an expert's residual r = θ_t − D is stored, and read back row by row.

A code sees a residual as a matrix (first axis × the rest flattened; a vector is one row). `encode`
gets the whole matrix in float32 and returns the stored parts; `decode` gets the parts of a row range
(`Part.per_row` parts sliced to those rows, the others whole) and returns those rows in float32, in
memory of their own (callers scale them in place), so serving and export rebuild a tensor a row
chunk at a time. `layout` gives every part's shape and
dtype before anything is encoded: the stored bytes the memory budget counts are exactly those.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergewise.errors import MergewiseError
from mergewise.mediator.codes.spectrum import SampleSpectrum

BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # first entry in the high bit


@dataclass(frozen=True)
class Part:
    shape: tuple[int, ...]
    dtype: torch.dtype
    per_row: bool = True  # its first axis runs over the residual's rows

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


Stored = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ResidualCode:
    """`level` is the code's one size knob (a sparse code's density, a low-rank code's rank); codes
    without one ignore it."""

    name: str
    layout: Callable[[int, int, torch.dtype, float | None], dict[str, Part]]
    encode: Callable[[torch.Tensor, torch.dtype, float | None], Stored]
    decode: Callable[[Stored, int], torch.Tensor]
    check: Callable[[Stored, int, str], None] = lambda stored, columns, where: None  # values a layout cannot see
    row_local: bool = True  # encoding a row chunk alone gives that chunk's stored rows
    # For codes that are not row-local: encode from `read(rows)` (float32 residual rows) with
    # (read, rows, columns, dtype, level), so the whole residual never has to be in memory.
    encode_rows: Callable | None = None
    # For codes that are not row-local: the share of a matrix's ‖·‖² each level keeps, estimated from
    # a sample of its rows, (SampleSpectrum of the sample, levels) → {level: share}.
    kept_shares: Callable[[SampleSpectrum, list[float]], dict[float, float]] | None = None
    # For codes whose decode is zero but at a few columns per row: those columns [rows, k] and their
    # values, as stored, so that serving touches only them.
    entries: Callable[[Stored], tuple[torch.Tensor, torch.Tensor]] | None = None
    # Serving's CPU fast path: add decode(stored) to D's rows (bf16 or float32 [rows, columns], in
    # place) in one pass, bit for bit as `(rows.float() + decode(stored, columns)).to(rows.dtype)`.
    add_to: Callable[[Stored, torch.Tensor], None] | None = None
    # What the `mediator:` block, the allocation and the build read:
    # the block's key that sets the level (`density`, `rank`); None: the code has no level.
    level_setting: str | None = None
    # The levels a budget is filled with, largest first: a named code's `auto` level is the largest
    # at which every routed unit fits.
    levels: tuple[float, ...] = ()
    # A named code's `auto` level where there is no budget to fill (with `route_threshold`).
    threshold_level: float | None = None
    # The (code, level) options `code: auto` weighs: these levels (None for a code without one);
    # none: auto never chooses the code.
    auto_levels: tuple[float | None, ...] = ()
    # A recipe may name it as `mediator.code` (`full`, the vectors' code, is not one to choose).
    selectable: bool = True

    def stored_bytes(self, rows: int, columns: int, dtype: torch.dtype, level: float | None) -> int:
        return sum(part.nbytes for part in self.layout(rows, columns, dtype, level).values())

    def validate(
        self, stored: Stored, rows: int, columns: int, dtype: torch.dtype, level: float | None, where: str
    ) -> None:
        """A folder from elsewhere may hold anything: every part present, of its exact shape and dtype,
        and its values within range, before any of it is decoded."""
        layout = self.layout(rows, columns, dtype, level)
        for suffix, part in layout.items():
            tensor = stored.get(suffix)
            if tensor is None:
                raise MergewiseError(f"{where}.{suffix} is missing")
            if tensor.dtype != part.dtype or tuple(tensor.shape) != part.shape:
                raise MergewiseError(
                    f"{where}.{suffix} must be {part.dtype} {list(part.shape)}, got {tensor.dtype} {list(tensor.shape)}"
                )
            if part.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                raise MergewiseError(f"{where}.{suffix} holds NaN or infinite values")
        extra = sorted(set(stored) - set(layout))
        if extra:
            raise MergewiseError(f"{where}.{extra[0]} is not part of a {self.name} expert")
        self.check(stored, columns, where)


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def packed_width(columns: int) -> int:
    return (columns + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Rows of booleans → rows of uint8, eight entries a byte (padding bits are zero)."""
    rows, columns = bits.shape
    padded = torch.zeros((rows, packed_width(columns) * 8), dtype=torch.uint8, device=bits.device)
    padded[:, :columns] = bits
    return (padded.view(rows, -1, 8) * BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def bits_as(packed: torch.Tensor, columns: int, zero: float, one: float) -> torch.Tensor:
    """The inverse of `pack_bits` as float32 rows, `columns` wide: each 0 bit becomes `zero`, each 1
    bit `one`. One table lookup per byte, several times faster than shifting and masking, which
    matters because serving decodes every routed weight at each route switch."""
    table = _bit_table(zero, one, str(packed.device))
    return F.embedding(packed.int(), table).reshape(packed.shape[0], -1)[:, :columns]


@functools.cache
def _bit_table(zero: float, one: float, device: str) -> torch.Tensor:
    """[256, 8]: each byte's bits, first entry in the high bit, as `zero`/`one`."""
    bits = ((torch.arange(256)[:, None] >> torch.arange(7, -1, -1)) & 1).bool()
    return torch.where(bits, one, zero).float().to(device)
