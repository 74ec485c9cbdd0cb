"""Fused CPU kernels for the task-arithmetic family on bf16 rows, compiled with numba.

Eager torch makes one pass over memory per operation: a TIES merge of three models is ~25 passes,
and its comparisons and boolean products run far below memory speed. These kernels do the same
arithmetic block by block in one pass, rounding to bf16 after each step exactly where eager torch's
bf16 operations round (compute in float32, round to nearest even), so their output is bit-identical
to the eager path; the tests compare the two. Compiled code is cached on disk after the first use.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numba
import numpy as np
import torch
from numba import carray, njit, prange

from mergewise.methods.bf16_bits import int16_at, narrow, round_bf16, uint8_at, widen
from mergewise.methods.sparsify import bf16_on_cpu

BLOCK = 4096  # elements per work item: the block's float32 scratch stays in L1/L2
EXPONENT = np.int16(0x7F80)  # a bf16's exponent bits


@njit(parallel=True, cache=True)
def _task_arithmetic(
    base,
    input_addresses,
    weights,
    scales,
    mask_addresses,
    mask_sizes,
    mask_offsets,
    sparsified,
    consensus,
    normalize,
    divisor,
    lambda_,
    out,
):
    """Writes `out`; returns how many of its values are NaN or infinite. Input i's rows (bf16 bits, as
    many as `base`) start at `input_addresses[i]`; its kept entries are `mask_sizes[i]` bytes of bits
    (little-endian within a byte) at `mask_addresses[i]`, these rows' first at bit `mask_offsets[i]`.
    Addresses rather than a tuple of arrays keep one compilation for any number of inputs."""
    size = base.shape[0]
    count = input_addresses.shape[0]
    blocks = (size + BLOCK - 1) // BLOCK
    non_finite = 0
    # Each step is its own simple loop over the block so that LLVM vectorises it.
    for block in prange(blocks):
        start = block * BLOCK
        stop = min(size, start + BLOCK)
        width = stop - start
        base_block = base[start:stop]
        base_values = np.empty(BLOCK, np.float32)
        weighted = np.empty((count, BLOCK), np.float32)
        total = np.zeros(BLOCK, np.float32)
        mask = np.empty(BLOCK + 8, np.uint8)
        for k in range(width):
            base_values[k] = widen(base_block[k])
        for index in range(count):
            rows = carray(int16_at(input_addresses[index]), size)[start:stop]  # type: ignore[call-arg]  # an intrinsic
            row_weighted = weighted[index]
            weight = weights[index]
            scale = scales[index]
            masked = sparsified[index]
            if masked:
                bits = carray(uint8_at(mask_addresses[index]), mask_sizes[index])
                first_bit = mask_offsets[index] + start
                if first_bit & 7 == 0:  # whole bytes: unpacked eight at a time
                    first_byte = first_bit >> 3
                    for byte in range((width + 7) >> 3):
                        packed = bits[first_byte + byte]
                        for bit in range(8):
                            mask[(byte << 3) + bit] = (packed >> bit) & 1
                else:
                    for k in range(width):
                        position = first_bit + k
                        mask[k] = (bits[position >> 3] >> (position & 7)) & 1
                for k in range(width):
                    delta = round_bf16(widen(rows[k]) - base_values[k])
                    delta = delta if mask[k] else np.float32(0) * delta
                    row_weighted[k] = delta
            else:
                for k in range(width):
                    row_weighted[k] = round_bf16(widen(rows[k]) - base_values[k])
            if scale != 1:
                for k in range(width):
                    row_weighted[k] = round_bf16(row_weighted[k] * scale)
            for k in range(width):
                value = round_bf16(row_weighted[k] * weight)
                row_weighted[k] = value
                total[k] += value
        if consensus:
            combined = np.zeros(BLOCK, np.float32)
            shares = np.zeros(BLOCK, np.float32)
            positive = np.empty(BLOCK, np.bool_)
            for k in range(width):
                positive[k] = round_bf16(total[k]) >= 0
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
                    share = round_bf16(shares[k])
                    total[k] = round_bf16(combined[k]) / (np.float32(1) if share == 0 else share)
            else:
                for k in range(width):
                    total[k] = combined[k]
        elif normalize:
            for k in range(width):
                total[k] = round_bf16(total[k]) / divisor
        out_block = out[start:stop]
        if lambda_ == 1:
            for k in range(width):
                out_block[k] = narrow(base_values[k] + round_bf16(total[k]))
        else:
            for k in range(width):
                out_block[k] = narrow(base_values[k] + round_bf16(round_bf16(total[k]) * lambda_))
        for k in range(width):  # every exponent bit set: infinity or NaN
            non_finite += (out_block[k] & EXPONENT) == EXPONENT
    return non_finite


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.int16).numpy()


def _floats(values: list[np.float32]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _as_bf16_scalar(value: float) -> np.float32:
    return np.float32(float(torch.tensor(value, dtype=torch.bfloat16)))


# The mask of an input that keeps every entry (never read: its `sparsified` flag is off).
_NO_SELECTION = (np.zeros(1, dtype=np.uint8), 0)


def supports(tensors: list[torch.Tensor]) -> bool:
    """Whether these rows can take the fused path: bf16 on the CPU."""
    return bf16_on_cpu(*tensors)


# Numba's fallback threading layer (workqueue) aborts on parallel launches from two threads at once,
# and kernels are warmed up on a background thread while others may run: one launch at a time.
_launch_lock = threading.Lock()


@contextlib.contextmanager
def _launch() -> Iterator[None]:
    """One launch at a time, on as many threads as the caller gave torch. numba's thread count is the
    calling thread's setting, so it is put back afterwards, and so is torch's: numba's OpenMP layer
    sets the OpenMP count that torch reads too."""
    with _launch_lock:
        threads, previous = torch.get_num_threads(), numba.get_num_threads()
        numba_threads = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # numba.config sets it at import
        numba.set_num_threads(max(1, min(threads, numba_threads)))
        try:
            yield
        finally:
            numba.set_num_threads(previous)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


def task_arithmetic(
    base: torch.Tensor,
    inputs: list[torch.Tensor],
    *,
    weights: list[float],
    scales: list[float],
    masks: list[tuple[np.ndarray, int] | None],
    consensus: bool,
    normalize: bool,
    divisor: float,
    lambda_: float,
) -> tuple[torch.Tensor, bool]:
    """base + lambda · combine(weight_i · scale_i · masked (input_i − base)), in one pass, and whether
    any of it is NaN or infinite (counted in the same pass, so the engine need not check).

    `masks[i]` says which entries of these rows input i keeps (None: every entry): packed bits, little-endian
    within a byte, and the position of these rows' first entry among them. `divisor` is the normaliser
    without consensus (with consensus it is per entry, from the agreeing weights).
    """
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    rows = [_bits(tensor) for tensor in inputs]  # kept alive through the call: the kernel reads them
    bits = [(mask or _NO_SELECTION)[0] for mask in masks]
    with _launch():
        non_finite = _task_arithmetic(
            _bits(base),
            _addresses(rows),
            _floats([_as_bf16_scalar(weight) for weight in weights]),
            _floats([_as_bf16_scalar(scale) for scale in scales]),
            _addresses(bits),
            np.array([mask_bits.size for mask_bits in bits], dtype=np.int64),
            np.array([(mask or _NO_SELECTION)[1] for mask in masks], dtype=np.int64),
            np.array([mask is not None for mask in masks]),
            consensus,
            normalize,
            _as_bf16_scalar(divisor),
            np.float32(lambda_),
            _bits(out),
        )
    return out, non_finite > 0


def _addresses(arrays: list[np.ndarray]) -> np.ndarray:
    """Where each contiguous array's memory starts."""
    assert all(array.flags.c_contiguous for array in arrays)
    return np.array([array.ctypes.data for array in arrays], dtype=np.int64)


def warm_up() -> None:
    """Load (or, the first time, compile) the kernels: one compilation serves any number of inputs."""
    rows = torch.zeros(BLOCK + 1, dtype=torch.bfloat16)
    mask = (np.full(BLOCK // 8 + 1, 0xFF, dtype=np.uint8), 0)
    task_arithmetic(
        rows,
        [rows, rows],
        weights=[1.0, 1.0],
        scales=[1.0, 1.0],
        masks=[mask, None],
        consensus=True,
        normalize=True,
        divisor=1.0,
        lambda_=1.0,
    )
