"""Fused CPU kernels for route switches: each writes D + decode(r_t) into the routed rows in one pass.

A switch rewrites every routed weight of the model, so on the CPU it is bound by passes over memory:
torch's decode → add → round → copy (and for a sparse code: index arithmetic, take, index_put) costs
several. These kernels read the stored parts as they are (packed bits, int16 columns, bf16 values) and
round once, exactly where the torch path rounds (the sum in float32, then the weight's dtype), so
either path leaves the same bits; the tests compare them. They take bf16 weights as int16 bit patterns
and float32 weights as they are; `mediator.switching` is their torch-facing side.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from mergewise.methods.bf16_bits import bits_float, float_bits, narrow, widen


def _as_float(stored):
    """A stored element (bf16 bit pattern or float32) as float32."""


@overload(_as_float)
def _as_float_impl(stored):
    if isinstance(stored, types.Integer):
        return lambda stored: widen(stored)
    return lambda stored: np.float32(stored)


def _rounded(value, like):
    """A float32 result stored in `like`'s representation, rounded as torch rounds to that dtype."""


@overload(_rounded)
def _rounded_impl(value, like):
    if isinstance(like, types.Integer):
        return lambda value, like: narrow(value)
    return lambda value, like: np.float32(value)


@njit
def _outside(columns, row, width):
    """Whether any of the row's columns falls outside [0, width) (checked before the row is written:
    the columns come from a file)."""
    outside = False
    for j in range(columns.shape[1]):
        outside |= (columns[row, j] < 0) | (columns[row, j] >= width)
    return outside


@njit(cache=True, nogil=True)
def add_entries(weights, columns, values, kept):
    """weights[r, columns[r, j]] += values[r, j], keeping the old values; -1, or the first row whose
    columns fall outside the weights (nothing of that row written)."""
    rows, width = weights.shape
    for row in range(rows):
        if _outside(columns, row, width):
            return row
        for j in range(columns.shape[1]):
            column = columns[row, j]
            old = weights[row, column]
            kept[row, j] = old
            weights[row, column] = _rounded(_as_float(old) + _as_float(values[row, j]), old)
    return -1


@njit(cache=True, nogil=True)
def put_entries(weights, columns, kept):
    rows, width = weights.shape
    for row in range(rows):
        if _outside(columns, row, width):
            return row
        for j in range(columns.shape[1]):
            weights[row, columns[row, j]] = kept[row, j]
    return -1


@njit
def _add_sign_step(weights, row, column, signs_byte, high_byte, shift, low, top):
    magnitude = top if (high_byte >> shift) & 1 else low
    step = bits_float(float_bits(magnitude) ^ (((signs_byte >> shift) & 1) << 31))  # exact negation
    old = weights[row, column]
    weights[row, column] = _rounded(_as_float(old) + step, old)


@njit(cache=True, nogil=True)
def add_signs(weights, signs, high, low_levels, high_levels):
    """weights[r, c] += ±(high bit ? high level : low level), the sign bit set meaning negative; bits
    run from the high bit of each byte. Whole bytes take an unrolled loop of eight, which vectorises."""
    rows, width = weights.shape
    whole = width >> 3
    for row in range(rows):
        low = low_levels[row]
        top = high_levels[row]
        for byte in range(whole):
            signs_byte = np.int32(signs[row, byte])
            high_byte = np.int32(high[row, byte])
            for bit in range(8):
                _add_sign_step(weights, row, (byte << 3) + bit, signs_byte, high_byte, 7 - bit, low, top)
        for column in range(whole << 3, width):
            _add_sign_step(
                weights,
                row,
                column,
                np.int32(signs[row, whole]),
                np.int32(high[row, whole]),
                7 - (column & 7),
                low,
                top,
            )
