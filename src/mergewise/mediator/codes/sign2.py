"""`sign2`: two bits per entry, sign(r) times one of two per-row levels.

Each row's |r| is split in two groups, each stored at its own mean (the L2-optimal level of a group).
The split starts at the row median and takes a few Lloyd steps (split at the midpoint of the two
levels, re-average), each of which can only lower the error."""

from __future__ import annotations

import torch

from mergewise.mediator import switching
from mergewise.mediator.codes.base import Part, ResidualCode, Stored, bits_as, pack_bits, packed_width

LLOYD_STEPS = 3


def layout(rows: int, columns: int, dtype: torch.dtype, level: float | None) -> dict[str, Part]:
    width = packed_width(columns)
    return {
        "signs": Part((rows, width), torch.uint8),
        "high": Part((rows, width), torch.uint8),
        "levels": Part((rows, 2), dtype),
    }


def _levels(magnitudes: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Mean magnitude of the low and the high group of each row (0 for an empty group)."""
    weights = high.double()
    count_high = weights.sum(-1, keepdim=True)
    total = magnitudes.sum(-1, keepdim=True, dtype=torch.float64)
    sum_high = (magnitudes.double() * weights).sum(-1, keepdim=True)
    count_low = magnitudes.shape[-1] - count_high
    low = torch.where(count_low > 0, (total - sum_high) / count_low.clamp_min(1), 0.0)
    return torch.cat([low, torch.where(count_high > 0, sum_high / count_high.clamp_min(1), 0.0)], -1)


def encode(residual: torch.Tensor, dtype: torch.dtype, level: float | None) -> Stored:
    residual = residual.float()
    magnitudes = residual.abs()
    high = magnitudes > magnitudes.median(-1, keepdim=True).values
    levels = _levels(magnitudes, high)
    for _ in range(LLOYD_STEPS):
        high = magnitudes > (levels.sum(-1, keepdim=True) / 2).float()
        levels = _levels(magnitudes, high)
    return {"signs": pack_bits(residual < 0), "high": pack_bits(high), "levels": levels.to(dtype)}


def decode(stored: Stored, columns: int) -> torch.Tensor:
    levels = stored["levels"].float()
    high = bits_as(stored["high"], columns, 0.0, 1.0)
    magnitude = torch.lerp(levels[:, :1].expand_as(high), levels[:, 1:].expand_as(high), high)  # exact at 0 and 1
    return magnitude.mul_(bits_as(stored["signs"], columns, 1.0, -1.0))


def add_to(stored: Stored, rows: torch.Tensor) -> None:
    switching.add_signs(rows, stored["signs"], stored["high"], stored["levels"])


SIGN2 = ResidualCode("sign2", layout, encode, decode, add_to=add_to, auto_levels=(None,))
