"""`sparse`: the top-ρ entries of each row by magnitude, at their own values (ρ = the level).

Per row rather than per tensor so that a row chunk is encoded and decoded on its own; each row keeps
the same count k, stored as a [rows, k] matrix of values (model dtype) and of ascending column
positions (int16 while the rows are narrow enough, else int32)."""

from __future__ import annotations

import torch

from mergewise.errors import MergewiseError
from mergewise.mediator.codes.base import Part, ResidualCode, Stored
from mergewise.methods.sparsify import kept_count

DEFAULT_DENSITY = 0.1
DENSITIES = tuple(sorted({step / 100 for step in range(1, 101)} | {0.0625}, reverse=True))


def _kept(columns: int, level: float | None) -> int:
    return kept_count(columns, DEFAULT_DENSITY if level is None else level)


def _index_dtype(columns: int) -> torch.dtype:
    return torch.int16 if columns <= torch.iinfo(torch.int16).max else torch.int32


def layout(rows: int, columns: int, dtype: torch.dtype, level: float | None) -> dict[str, Part]:
    kept = _kept(columns, level)
    return {"values": Part((rows, kept), dtype), "indices": Part((rows, kept), _index_dtype(columns))}


def encode(residual: torch.Tensor, dtype: torch.dtype, level: float | None) -> Stored:
    residual = residual.float()
    columns = residual.shape[-1]
    indices = residual.abs().topk(_kept(columns, level), dim=-1, sorted=False).indices.sort(-1).values
    return {"values": residual.gather(-1, indices).to(dtype), "indices": indices.to(_index_dtype(columns))}


def decode(stored: Stored, columns: int) -> torch.Tensor:
    values = stored["values"]
    rows = torch.zeros((values.shape[0], columns), dtype=torch.float32, device=values.device)
    return rows.scatter_(-1, stored["indices"].long(), values.float())


def check(stored: Stored, columns: int, where: str) -> None:
    indices = stored["indices"]
    if indices.numel() and (
        int(indices.min()) < 0 or int(indices.max()) >= columns or not bool((indices[:, 1:] > indices[:, :-1]).all())
    ):
        raise MergewiseError(f"{where}.indices must be ascending column positions in [0, {columns}) per row")


def entries(stored: Stored) -> tuple[torch.Tensor, torch.Tensor]:
    return stored["indices"], stored["values"]


SPARSE = ResidualCode(
    "sparse",
    layout,
    encode,
    decode,
    check,
    entries=entries,
    level_setting="density",
    levels=DENSITIES,
    threshold_level=DEFAULT_DENSITY,
    auto_levels=(0.03, 0.0625, 0.125, 0.25),
)
