"""Route switches on the CPU through the fused kernels of `mediator.kernels`: which weights take them,
and the calls on torch tensors. numba is loaded on the first switch, not by every import."""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np
import torch

SUPPORTED = (torch.bfloat16, torch.float32)


@functools.cache
def _kernels() -> ModuleType:
    from mergewise.mediator import kernels

    return kernels


def applies(weights: torch.Tensor) -> bool:
    """Whether these [rows, columns] weights can take the kernels: bf16 or float32 rows on the CPU, each
    row contiguous."""
    return weights.device.type == "cpu" and weights.dtype in SUPPORTED and weights.stride(-1) == 1


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of the same memory (bf16 as its int16 bit patterns)."""
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _checked(failed_row: int) -> None:
    if failed_row >= 0:
        raise ValueError(f"column positions outside the weight in row {failed_row}")


def add_entries(weights: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add `values` at `columns` of each row in place; returns the weights' previous values there."""
    kept = torch.empty(columns.shape, dtype=weights.dtype)
    _checked(_kernels().add_entries(_array(weights), columns.numpy(), _array(_exactly(values)), _array(kept)))
    return kept


def put_entries(weights: torch.Tensor, columns: torch.Tensor, kept: torch.Tensor) -> None:
    """Write `kept` back at `columns` of each row."""
    _checked(_kernels().put_entries(_array(weights), columns.numpy(), _array(kept)))


def add_signs(weights: torch.Tensor, signs: torch.Tensor, high: torch.Tensor, levels: torch.Tensor) -> None:
    """Add ±level to every entry in place (a set sign bit: minus), per row the first or the last of
    `levels` [rows, 1 or 2] as the bit in `high` says."""
    levels = levels.float()
    _kernels().add_signs(
        _array(weights),
        signs.numpy(),
        high.numpy(),
        levels[:, 0].contiguous().numpy(),
        levels[:, -1].contiguous().numpy(),
    )


def _exactly(values: torch.Tensor) -> torch.Tensor:
    """Values the kernels read as they are: bf16 and float32; any other dtype as float32 (exact)."""
    return values if values.dtype in SUPPORTED else values.float()
