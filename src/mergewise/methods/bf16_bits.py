"""bf16 arithmetic in numba, rounded exactly where eager torch's bf16 operations round (compute in
float32, round to nearest even), so that kernels built on it give torch's bits."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def float_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_float(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always")
def widen(bits):
    """bf16 bit pattern → float32 (exact)."""
    return bits_float(np.int32(bits) << 16)


@njit(inline="always")
def narrow(value):
    """float32 → bf16 bit pattern, rounding to nearest even; NaN stays a (quiet) NaN."""
    bits = float_bits(value)
    rounded = (bits + np.int32(0x7FFF) + ((bits >> 16) & np.int32(1))) >> 16
    quiet_nan = (bits >> 16) | np.int32(0x40)
    return np.int16(quiet_nan if value != value else rounded)


@njit(inline="always")
def round_bf16(value):
    """A float32 result as eager bf16 arithmetic leaves it."""
    return widen(narrow(value))


@njit(cache=True, nogil=True)
def magnitude_keys(inputs, base, descending, out):
    """mergekit's sort keys of |input − base| (bf16 bit patterns) as `sparsify.magnitude_keys` makes
    them from the delta, in one pass: 15-bit magnitudes, every NaN one key above infinity, negated
    for a descending sort."""
    for index in range(out.shape[0]):
        key = narrow(widen(inputs[index]) - widen(base[index])) & np.int16(0x7FFF)
        key = min(key, np.int16(0x7F81))
        out[index] = -key if descending else key


VARIANCE_BLOCK = 2048  # entries per step: a block's float64 accumulators stay in L1


@njit(cache=True, nogil=True)
def variance_keys(inputs, base, out):
    """Sort keys of the variance across models of the task vectors `inputs[i] − base` (bf16 bit
    patterns, one row per model), as `torch.var(…, dim=0, unbiased=False).abs()` gives it on bf16:
    each difference rounded to bf16, Welford's update in float64 over the models, the quotient
    rounded to float32 then to bf16. Keys as `magnitude_keys` makes them, negated (topk takes the
    largest); returns how many variances are not zero. Models are the outer loop of each block, so
    that LLVM vectorises the entries."""
    models = inputs.shape[0]
    size = out.shape[0]
    nonzero = 0
    mean = np.empty(VARIANCE_BLOCK, np.float64)
    squares = np.empty(VARIANCE_BLOCK, np.float64)
    for start in range(0, size, VARIANCE_BLOCK):
        width = min(VARIANCE_BLOCK, size - start)
        base_block = base[start : start + width]
        mean[:width] = 0.0
        squares[:width] = 0.0
        for model in range(models):
            row = inputs[model, start : start + width]
            count = np.float64(model + 1)
            for k in range(width):
                value = np.float64(round_bf16(widen(row[k]) - widen(base_block[k])))
                delta = value - mean[k]
                mean[k] += delta / count
                squares[k] += delta * (value - mean[k])
        for k in range(width):
            key = min(narrow(np.float32(squares[k] / models)) & np.int16(0x7FFF), np.int16(0x7F81))
            nonzero += key != 0
            out[start + k] = -key
    return nonzero


@intrinsic
def int16_at(typingctx, address):
    """The int16 memory at an address (an int64): arrays of any number of inputs pass as one array of
    addresses, so that one compilation serves them all."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(16)))

    return types.CPointer(types.int16)(types.int64), codegen


@intrinsic
def uint8_at(typingctx, address):
    """The uint8 memory at an address (an int64), as `int16_at`."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))

    return types.CPointer(types.uint8)(types.int64), codegen


def warm_up() -> None:
    """Load (or, the first time, compile) this module's kernels."""
    rows = np.zeros((2, 3), dtype=np.int16)
    keys = np.empty(3, dtype=np.int16)
    magnitude_keys(rows[0], rows[1], True, keys)
    variance_keys(rows, rows[0], keys)
