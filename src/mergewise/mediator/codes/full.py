"""`full`: the residual itself in float32. Lossless (D + r rounds back to θ_t exactly: the
difference of two values of a narrower dtype is exact in float32), and used for vectors (norm
weights, biases), which are too small for a lossy code to save anything worth their error."""

from __future__ import annotations

import torch

from mergewise.mediator.codes.base import Part, ResidualCode, Stored


def layout(rows: int, columns: int, dtype: torch.dtype, level: float | None) -> dict[str, Part]:
    return {"residual": Part((rows, columns), torch.float32)}


def encode(residual: torch.Tensor, dtype: torch.dtype, level: float | None) -> Stored:
    return {"residual": residual.float().contiguous()}


def decode(stored: Stored, columns: int) -> torch.Tensor:
    return stored["residual"].to(torch.float32, copy=True)  # callers may scale it in place


FULL = ResidualCode("full", layout, encode, decode, selectable=False)
