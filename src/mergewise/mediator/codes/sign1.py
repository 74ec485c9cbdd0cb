"""`sign1`: one bit per entry, sign(r) · α per row with α = mean |r| of the row.

For a fixed sign pattern s, ‖r − α s‖² is smallest at α = Σ|r| / n (the derivative −2Σ(|r| − α) is
zero there), so this is the L2-optimal 1-bit code; it keeps (Σ|r|)² / n of the row's ‖r‖²."""

from __future__ import annotations

import torch

from mergewise.mediator import switching
from mergewise.mediator.codes.base import Part, ResidualCode, Stored, bits_as, pack_bits, packed_width


def layout(rows: int, columns: int, dtype: torch.dtype, level: float | None) -> dict[str, Part]:
    return {"signs": Part((rows, packed_width(columns)), torch.uint8), "scale": Part((rows, 1), dtype)}


def encode(residual: torch.Tensor, dtype: torch.dtype, level: float | None) -> Stored:
    residual = residual.float()
    scale = residual.abs().mean(-1, keepdim=True, dtype=torch.float64)
    return {"signs": pack_bits(residual < 0), "scale": scale.to(dtype)}


def decode(stored: Stored, columns: int) -> torch.Tensor:
    return bits_as(stored["signs"], columns, 1.0, -1.0).mul_(stored["scale"].float())


def add_to(stored: Stored, rows: torch.Tensor) -> None:
    switching.add_signs(rows, stored["signs"], stored["signs"], stored["scale"])  # one level: any bits pick it


SIGN1 = ResidualCode("sign1", layout, encode, decode, add_to=add_to, auto_levels=(None,))
