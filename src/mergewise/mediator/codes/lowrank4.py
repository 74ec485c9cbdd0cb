"""`lowrank4`: the residual's rank-k approximation with 4-bit factors (k = the level).

At the bytes of `lowrank`'s rank k in a 16-bit model this stores rank 4k, and the rank is what keeps a
residual: on the micro zoo's residuals rank 16 at 4 bits keeps 0.78 of ‖r‖² where rank 4 in bf16
keeps 0.42. The factors U·√S and √S·Vᵀ are quantized per component (a column of the left factor, a
row of the right) to the integers −7…7 with the absmax scale, shrunk where clipping the largest
entries lowers that component's error; the two scales of a component are stored as their product,
one value per component in the model dtype. Integers are stored as nibbles (value + 8), two a byte,
first entry in the high nibble.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mergewise.mediator.codes.base import Part, ResidualCode, Stored
from mergewise.mediator.codes.lowrank import RANKS, rank_of, top_factors
from mergewise.mediator.codes.spectrum import SampleSpectrum

LARGEST = 7
CLIPS = (1.0, 0.9, 0.8, 0.7)  # shares of a component's absmax tried as its largest level


def layout(rows: int, columns: int, dtype: torch.dtype, level: float | None) -> dict[str, Part]:
    rank = rank_of(rows, columns, level)
    return {
        "left": Part((rows, _packed(rank)), torch.uint8),
        "right": Part((rank, _packed(columns)), torch.uint8, per_row=False),
        "scale": Part((rank,), dtype, per_row=False),
    }


def encode(residual: torch.Tensor, dtype: torch.dtype, level: float | None) -> Stored:
    rows, columns = residual.shape
    return encode_rows(lambda span: residual[span].float(), rows, columns, dtype, level)


def encode_rows(
    read: Callable[[slice], torch.Tensor], rows: int, columns: int, dtype: torch.dtype, level: float | None
) -> Stored:
    """`read(rows)` gives those rows of the residual in float32."""
    return _stored(*top_factors(read, rows, columns, rank_of(rows, columns, level)), dtype)


def _stored(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> Stored:
    left_levels, left_scale = _quantized(left.T)
    right_levels, right_scale = _quantized(right)
    return {"left": _pack(left_levels.T), "right": _pack(right_levels), "scale": (left_scale * right_scale).to(dtype)}


def decode(stored: Stored, columns: int) -> torch.Tensor:
    rank = stored["scale"].shape[0]
    left = _unpack(stored["left"], rank).mul_(stored["scale"].float())
    return left @ _unpack(stored["right"], columns)


def kept_shares(spectrum: SampleSpectrum, ranks: list[float]) -> dict[float, float]:
    """The share of a matrix's ‖·‖² each rank keeps after quantization, measured on a sample of its
    rows (whose right singular vectors stand for the matrix's)."""
    sample, total = spectrum.sample, spectrum.energy
    if total == 0:
        return {rank: 1.0 for rank in ranks}
    rows, columns = sample.shape
    left, right = spectrum.factors(max(rank_of(rows, columns, rank) for rank in ranks))
    shares = {}
    for rank in ranks:
        kept = rank_of(rows, columns, rank)
        error = sample - decode(_stored(left[:, :kept], right[:kept], torch.float32), sample.shape[1])
        shares[rank] = 1.0 - float(error.double().square().sum()) / total
    return shares


def _quantized(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `vectors` as integers −7…7 times its scale: the scale among CLIPS·absmax/7 with the
    smallest squared error."""
    absmax = vectors.abs().amax(-1, keepdim=True)

    def clipped(clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Levels, scale and squared error with the largest level at `clip`·absmax."""
        scale = torch.where(absmax > 0, absmax * (clip / LARGEST), torch.ones_like(absmax))
        levels = (vectors / scale).round_().clamp_(-LARGEST, LARGEST)
        return levels, scale, (vectors - levels * scale).square().sum(-1, keepdim=True)

    best_levels, best_scale, best_error = clipped(CLIPS[0])
    for clip in CLIPS[1:]:
        levels, scale, error = clipped(clip)
        better = error < best_error
        best_levels = torch.where(better, levels, best_levels)
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.minimum(error, best_error)
    return best_levels, best_scale[:, 0]


def _packed(width: int) -> int:
    return (width + 1) // 2


def _pack(levels: torch.Tensor) -> torch.Tensor:
    """Rows of integers −7…7 → rows of bytes, two nibbles (value + 8) each; an odd row's last low nibble is 8 (zero)."""
    rows, width = levels.shape
    nibbles = torch.full((rows, _packed(width) * 2), 8, dtype=torch.uint8)
    nibbles[:, :width] = (levels + 8).to(torch.uint8)
    return (nibbles[:, 0::2] << 4 | nibbles[:, 1::2]).contiguous()


def _unpack(packed: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of `_pack` as float32 rows, `width` wide (one table lookup per byte)."""
    return F.embedding(packed.int(), _nibble_table(str(packed.device))).reshape(packed.shape[0], -1)[:, :width]


@functools.cache
def _nibble_table(device: str) -> torch.Tensor:
    """[256, 2]: each byte's high and low nibble, minus 8."""
    byte = torch.arange(256)
    return torch.stack([byte >> 4, byte & 15], dim=1).float().sub_(8).to(device)


LOWRANK4 = ResidualCode(
    "lowrank4",
    layout,
    encode,
    decode,
    row_local=False,
    encode_rows=encode_rows,
    kept_shares=kept_shares,
    level_setting="rank",
    levels=RANKS,
    threshold_level=64,
    auto_levels=(2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128),
)
