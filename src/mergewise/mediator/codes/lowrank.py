"""`lowrank`: the residual's truncated SVD at rank k (the level), as Twin-Merging stores its experts.

Stored as two factors in the model dtype, left = U·√S [rows, k] and right = √S·Vᵀ [k, columns]
(split evenly so neither factor's range strains a 16-bit dtype). A row chunk decodes as its rows of
`left` times the whole of `right`; encoding needs the whole matrix."""

from __future__ import annotations

import torch

from mergewise.mediator.codes.base import Part, ResidualCode, Stored

DEFAULT_RANK = 16


def _rank(rows: int, columns: int, level: float | None) -> int:
    return max(1, min(rows, columns, int(DEFAULT_RANK if level is None else level)))


def layout(rows: int, columns: int, dtype: torch.dtype, level: float | None) -> dict[str, Part]:
    rank = _rank(rows, columns, level)
    return {"left": Part((rows, rank), dtype), "right": Part((rank, columns), dtype, per_row=False)}


def encode(residual: torch.Tensor, dtype: torch.dtype, level: float | None) -> Stored:
    rank = _rank(*residual.shape, level)
    left, singular, right = torch.linalg.svd(residual.float(), full_matrices=False)
    root = singular[:rank].sqrt()
    return {"left": (left[:, :rank] * root).to(dtype).contiguous(),
            "right": (root[:, None] * right[:rank]).to(dtype).contiguous()}


def decode(stored: Stored, columns: int) -> torch.Tensor:
    return stored["left"].float() @ stored["right"].float()


LOWRANK = ResidualCode("lowrank", layout, encode, decode, row_local=False)
