"""`lowrank`: the residual's rank-k approximation (k = the level), as Twin-Merging stores its experts.

Stored as two factors in the model dtype, left = U·√S [rows, k] and right = √S·Vᵀ [k, columns]
(split evenly so neither factor's range strains a 16-bit dtype). A row chunk decodes as its rows of
`left` times the whole of `right`. Encoding needs the whole matrix: small ones get an exact SVD;
larger ones a randomized SVD (a seeded range sketch with power steps) that reads the residual a row
chunk at a time, so encoding never holds more than the sketch and one chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergewise.mediator.codes.base import Part, ResidualCode, Stored
from mergewise.mediator.codes.spectrum import SampleSpectrum

DEFAULT_RANK = 16
EXACT_UP_TO = 1 << 22  # entries of a matrix given an exact SVD
OVERSAMPLING = 10  # sketch columns beyond the rank
POWER_STEPS = 2  # each sharpens the sketch toward the top singular vectors
CHUNK_ENTRIES = 1 << 20  # residual entries read at a time by the randomized SVD
RANKS = tuple(sorted({2**power for power in range(13)} | {3 * 2**power for power in range(12)}, reverse=True))


def rank_of(rows: int, columns: int, level: float | None) -> int:
    return max(1, min(rows, columns, int(DEFAULT_RANK if level is None else level)))


def layout(rows: int, columns: int, dtype: torch.dtype, level: float | None) -> dict[str, Part]:
    rank = rank_of(rows, columns, level)
    return {"left": Part((rows, rank), dtype), "right": Part((rank, columns), dtype, per_row=False)}


def encode(residual: torch.Tensor, dtype: torch.dtype, level: float | None) -> Stored:
    rows, columns = residual.shape
    return encode_rows(lambda chunk: residual[chunk].float(), rows, columns, dtype, level)


def encode_rows(
    read: Callable[[slice], torch.Tensor],
    rows: int,
    columns: int,
    dtype: torch.dtype,
    level: float | None,
    *,
    exact_up_to: int = EXACT_UP_TO,
    chunk_entries: int = CHUNK_ENTRIES,
) -> Stored:
    """`read(rows)` gives those rows of the residual in float32."""
    left, right = top_factors(
        read, rows, columns, rank_of(rows, columns, level), exact_up_to=exact_up_to, chunk_entries=chunk_entries
    )
    return {"left": left.to(dtype).contiguous(), "right": right.to(dtype).contiguous()}


def top_factors(
    read: Callable[[slice], torch.Tensor],
    rows: int,
    columns: int,
    rank: int,
    *,
    exact_up_to: int = EXACT_UP_TO,
    chunk_entries: int = CHUNK_ENTRIES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 factors U·√S [rows, rank] and √S·Vᵀ [rank, columns] of the best rank-k approximation:
    exact for matrices of up to `exact_up_to` entries, else randomized, reading `chunk_entries` at a time."""
    if rows * columns <= exact_up_to or rank + OVERSAMPLING >= min(rows, columns):
        left, singular, right = torch.linalg.svd(read(slice(0, rows)), full_matrices=False)
    else:
        left, singular, right = _randomized_svd(read, rows, columns, rank + OVERSAMPLING, chunk_entries)
    root = singular[:rank].sqrt()
    return left[:, :rank] * root, root[:, None] * right[:rank]


def _randomized_svd(
    read: Callable[[slice], torch.Tensor], rows: int, columns: int, sketch: int, chunk_entries: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    step = max(1, chunk_entries // columns)
    chunks = [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
    probe = torch.randn(columns, sketch, generator=torch.Generator().manual_seed(0))
    basis = torch.cat([read(chunk) @ probe for chunk in chunks])
    for _ in range(POWER_STEPS):
        basis = torch.linalg.qr(basis).Q
        transposed = sum(read(chunk).T @ basis[chunk] for chunk in chunks)
        transposed = torch.linalg.qr(transposed).Q
        basis = torch.cat([read(chunk) @ transposed for chunk in chunks])
    basis = torch.linalg.qr(basis).Q
    projected = sum(basis[chunk].T @ read(chunk) for chunk in chunks)  # [sketch, columns]
    left, singular, right = torch.linalg.svd(projected, full_matrices=False)
    return basis @ left, singular, right


def decode(stored: Stored, columns: int) -> torch.Tensor:
    return stored["left"].float() @ stored["right"].float()


def kept_energies(spectrum: SampleSpectrum, ranks: list[float]) -> dict[float, float]:
    """The share of a matrix's ‖·‖² its best rank-k approximation keeps, estimated from a sample of
    its rows (whose Gram matrix is the whole one's, scaled, in expectation): k → share."""
    squares = spectrum.energies
    total = float(squares.sum())
    return {rank: float(squares[: int(rank)].sum()) / total if total > 0 else 1.0 for rank in ranks}


LOWRANK = ResidualCode(
    "lowrank",
    layout,
    encode,
    decode,
    row_local=False,
    encode_rows=encode_rows,
    kept_shares=kept_energies,
    level_setting="rank",
    levels=RANKS,
    threshold_level=DEFAULT_RANK,
    auto_levels=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
