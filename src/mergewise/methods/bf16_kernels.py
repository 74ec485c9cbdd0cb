"""Fused CPU kernels for the task-arithmetic family on bf16 rows, compiled with numba.

Eager torch makes one pass over memory per operation: a TIES merge of three models is ~25 passes,
and its comparisons and boolean products run far below memory speed. These kernels do the same
arithmetic block by block in one pass, rounding to bf16 after each step exactly where eager torch's
bf16 operations round (compute in float32, round to nearest even), so their output is bit-identical
to the eager path; the tests compare the two. Compiled code is cached on disk after the first use.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

BLOCK = 4096  # elements per work item: the block's float32 scratch stays in L1/L2
HISTOGRAM_BINS = 1 << 15  # sign-free bf16 bit patterns


@intrinsic
def _float_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always")
def _widen(bits):
    """bf16 bit pattern → float32 (exact)."""
    return _bits_float(np.int32(bits) << 16)


@njit(inline="always")
def _narrow(value):
    """float32 → bf16 bit pattern, rounding to nearest even; NaN stays a (quiet) NaN."""
    bits = _float_bits(value)
    rounded = (bits + np.int32(0x7FFF) + ((bits >> 16) & np.int32(1))) >> 16
    quiet_nan = (bits >> 16) | np.int32(0x40)
    return np.int16(quiet_nan if value != value else rounded)


@njit(inline="always")
def _round(value):
    """A float32 result as eager bf16 arithmetic leaves it."""
    return _widen(_narrow(value))


@njit(parallel=True, cache=True)
def _task_arithmetic(base, inputs, weights, scales, lowers, uppers, sparsified, consensus, normalize, divisor,
                     lambda_, out):
    size = base.shape[0]
    count = len(inputs)
    blocks = (size + BLOCK - 1) // BLOCK
    # Each step is its own simple loop over the block so that LLVM vectorises it.
    for block in prange(blocks):
        start = block * BLOCK
        stop = min(size, start + BLOCK)
        width = stop - start
        base_block = base[start:stop]
        base_values = np.empty(BLOCK, np.float32)
        weighted = np.empty((count, BLOCK), np.float32)
        total = np.zeros(BLOCK, np.float32)
        for k in range(width):
            base_values[k] = _widen(base_block[k])
        for index in range(count):
            rows = inputs[index][start:stop]
            row_weighted = weighted[index]
            weight = weights[index]
            scale = scales[index]
            lower = lowers[index]
            upper = uppers[index]
            masked = sparsified[index]
            if masked:
                for k in range(width):
                    delta = _round(_widen(rows[k]) - base_values[k])
                    magnitude = abs(delta)
                    kept = (magnitude >= lower) & (magnitude <= upper)
                    delta = delta if kept else np.float32(0) * delta
                    row_weighted[k] = delta
            else:
                for k in range(width):
                    row_weighted[k] = _round(_widen(rows[k]) - base_values[k])
            if scale != 1:
                for k in range(width):
                    row_weighted[k] = _round(row_weighted[k] * scale)
            for k in range(width):
                value = _round(row_weighted[k] * weight)
                row_weighted[k] = value
                total[k] += value
        if consensus:
            combined = np.zeros(BLOCK, np.float32)
            shares = np.zeros(BLOCK, np.float32)
            positive = np.empty(BLOCK, np.bool_)
            for k in range(width):
                positive[k] = _round(total[k]) >= 0
            for index in range(count):
                weight = weights[index]
                row_weighted = weighted[index]
                for k in range(width):
                    value = row_weighted[k]
                    agrees = (value > 0) if positive[k] else (value < 0)
                    combined[k] += value if agrees else np.float32(0) * value
                    shares[k] += weight if agrees else np.float32(0)
            if normalize:
                for k in range(width):
                    share = _round(shares[k])
                    total[k] = _round(combined[k]) / (np.float32(1) if share == 0 else share)
            else:
                for k in range(width):
                    total[k] = combined[k]
        elif normalize:
            for k in range(width):
                total[k] = _round(total[k]) / divisor
        out_block = out[start:stop]
        if lambda_ == 1:
            for k in range(width):
                out_block[k] = _narrow(base_values[k] + _round(total[k]))
        else:
            for k in range(width):
                out_block[k] = _narrow(base_values[k] + _round(_round(total[k]) * lambda_))


@njit(parallel=True, cache=True)
def _magnitude_histogram(values, counts):
    size = values.shape[0]
    workers = counts.shape[0]
    step = (size + workers - 1) // workers
    for worker in prange(workers):
        for k in range(worker * step, min(size, (worker + 1) * step)):
            counts[worker, values[k] & 0x7FFF] += 1


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.int16).numpy()


def _floats(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _as_bf16_scalar(value: float) -> np.float32:
    return np.float32(float(torch.tensor(value, dtype=torch.bfloat16)))


def supports(tensors: list[torch.Tensor]) -> bool:
    """Whether these rows can take the fused path: bf16 on the CPU."""
    return all(tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu" for tensor in tensors)


# Numba's fallback threading layer (workqueue) aborts on parallel launches from two threads at once,
# and kernels are warmed up on a background thread while others may run: one launch at a time.
_launch_lock = threading.Lock()


def _follow_torch_threads() -> None:
    """Use as many threads as the engine gave torch."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def task_arithmetic(base: torch.Tensor, inputs: list[torch.Tensor], *, weights: list[float],
                    scales: list[float], bands: list[tuple[float, float] | None], consensus: bool,
                    normalize: bool, divisor: float, lambda_: float) -> torch.Tensor:
    """base + lambda · combine(weight_i · scale_i · band-masked (input_i − base)), in one pass.

    `bands[i]` is input i's kept |delta| range, None to keep every entry; `divisor` is the
    normaliser without consensus (with consensus it is per entry, from the agreeing weights).
    """
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    with _launch_lock:
        _follow_torch_threads()
        _task_arithmetic(
            _bits(base), tuple(_bits(tensor) for tensor in inputs),
            _floats([_as_bf16_scalar(weight) for weight in weights]),
            _floats([_as_bf16_scalar(scale) for scale in scales]),
            _floats([band[0] if band else 0.0 for band in bands]),
            _floats([band[1] if band else math.inf for band in bands]),
            np.array([band is not None for band in bands]), consensus, normalize,
            _as_bf16_scalar(divisor), np.float32(lambda_), _bits(out))
    return out


def warm_up(input_count: int) -> None:
    """Load (or, the first time, compile) the kernels for `input_count` inputs."""
    rows = torch.zeros(BLOCK + 1, dtype=torch.bfloat16)
    task_arithmetic(rows, [rows] * input_count, weights=[1.0] * input_count, scales=[1.0] * input_count,
                    bands=[(0.0, math.inf)] * input_count, consensus=True, normalize=True, divisor=1.0,
                    lambda_=1.0)
    magnitude_histogram(rows)


def magnitude_histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts of |values| by bf16 bit pattern (HISTOGRAM_BINS bins, ascending magnitude)."""
    with _launch_lock:
        _follow_torch_threads()
        counts = np.zeros((numba.get_num_threads(), HISTOGRAM_BINS), dtype=np.int64)
        _magnitude_histogram(_bits(values), counts)
    return torch.from_numpy(counts.sum(axis=0))


