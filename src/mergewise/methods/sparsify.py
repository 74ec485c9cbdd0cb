"""Sparsification primitives for task vectors: which entries of a delta survive, and the rescale.

Magnitude selection is defined on the whole tensor, so it is split in two: `MagnitudeRanks` finds
the surviving magnitude band from histograms of |delta|'s bit patterns gathered chunk by chunk (one
pass for bf16 data, whose 2^15 magnitudes fit one histogram; a second pass over the boundary buckets
otherwise), and `band_mask` applies it to any row chunk. Random masks are drawn per row chunk from
generators the engine seeds by (seed, tensor, model, chunk), so a second pass sees the same mask.
"""

from __future__ import annotations

import math
from enum import Enum

import torch

from mergewise.methods.kernel_loading import loaded_bf16_kernels


class Sparsification(str, Enum):
    MAGNITUDE = "magnitude"                    # TIES: keep the top-k |delta|
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: drop the largest too
    RANDOM = "random"                          # DARE: Bernoulli(density)
    RANK_RANDOM = "rank_random"                # DELLA: keep probability grows with rank in the row


def band_ranks(count: int, density: float, gamma: float | None = None) -> tuple[int, int] | None:
    """Ascending ranks [low, high] of the |delta| band that keeps a `density` share (None: keep none).

    Without gamma: the top max(1, ⌊density·n⌋) magnitudes (TIES). With gamma: the ⌊gamma·n⌋ largest
    are dropped first and ⌊density·n⌋ below them kept (breadcrumbs).
    """
    if gamma is None:
        return (count - max(1, int(density * count)), count - 1) if count else None
    keep = int(density * count)
    if keep == 0:
        return None
    low = max(0, count - keep - int(gamma * count))
    return low, low + keep - 1


_COARSE_BINS = 1 << 15  # sign-free high halves of float32 bit patterns
_FINE_BINS = 1 << 16


class MagnitudeRanks:
    """Exact |values| at given ascending ranks of a tensor seen chunk by chunk, in linear time.

    For non-negative floats the order of bit patterns is the order of values, so a histogram of the
    high 16 bits of float32 |x| locates each rank's bucket, and one of the low 16 bits inside that
    bucket its value. bf16 data has no low bits, so it needs only the first pass. A partial sort of a
    float copy is ~30× slower on the many equal magnitudes of bf16 deltas, and holds the whole tensor.
    """

    def __init__(self, ranks: list[int]):
        self.ranks = ranks
        self._coarse = torch.zeros(_COARSE_BINS, dtype=torch.int64)
        self._fine: dict[int, torch.Tensor] = {}
        self._only_high_bits = True
        self._located: list[tuple[int, int]] | None = None  # from the finished first pass

    @staticmethod
    def _keys(values: torch.Tensor) -> torch.Tensor:
        return values.abs().float().view(torch.int32).reshape(-1)

    def observe(self, values: torch.Tensor) -> None:
        """First pass: count every chunk's magnitudes by their high bits."""
        self._only_high_bits &= values.dtype == torch.bfloat16
        self._located = None
        kernels = loaded_bf16_kernels() if values.dtype == torch.bfloat16 and values.device.type == "cpu" else None
        if kernels is not None:
            self._coarse += kernels.magnitude_histogram(values)
        else:
            self._coarse += torch.bincount((self._keys(values) >> 16).cpu(), minlength=_COARSE_BINS)

    def _bucket_offsets(self) -> list[tuple[int, int]]:
        """(bucket, rank inside the bucket) for each rank, located once per finished first pass."""
        if self._located is None:
            cumulative = self._coarse.cumsum(0)
            self._located = []
            for rank in self.ranks:
                bucket = int(torch.searchsorted(cumulative, rank, right=True))
                self._located.append((bucket, rank - (int(cumulative[bucket - 1]) if bucket else 0)))
        return self._located

    @property
    def needs_refinement(self) -> bool:
        return not self._only_high_bits

    def refine(self, values: torch.Tensor) -> None:
        """Second pass (not for bf16): count the low bits of magnitudes in the rank buckets."""
        keys = self._keys(values)
        high = keys >> 16
        for bucket in {bucket for bucket, _ in self._bucket_offsets()}:  # ranks may share a bucket
            inside = keys[high == bucket] & 0xFFFF
            counts = torch.bincount(inside.cpu(), minlength=_FINE_BINS)
            self._fine[bucket] = self._fine[bucket] + counts if bucket in self._fine else counts

    def values(self) -> list[float]:
        found = []
        for bucket, offset in self._bucket_offsets():
            low = 0
            if self.needs_refinement:
                low = int(torch.searchsorted(self._fine[bucket].cumsum(0), offset, right=True))
            found.append(float(torch.tensor([(bucket << 16) | low], dtype=torch.int32).view(torch.float32)))
        return found


def sorted_selection_mask(magnitudes: torch.Tensor, density: float, gamma: float | None = None) -> torch.Tensor:
    """The band of `band_ranks` as a mask from a full sort of `magnitudes`: equal magnitudes at the
    cut are broken by torch's sort order, the same sorts mergekit makes."""
    count = magnitudes.numel()
    mask = torch.zeros(count, dtype=torch.bool)
    if density >= 1:
        return mask.fill_(True)
    if density <= 0 or count == 0:
        return mask
    if gamma is None:
        mask[torch.argsort(magnitudes, descending=True)[:max(1, int(density * count))]] = True
        return mask
    ranks = band_ranks(count, density, gamma)
    if ranks is not None:
        mask[torch.sort(magnitudes, descending=False).indices[ranks[0]:ranks[1] + 1]] = True
    return mask


def band_mask(delta: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    magnitude = delta.abs()
    if math.isinf(upper):
        return magnitude >= lower
    return (magnitude >= lower) & (magnitude <= upper)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    probabilities = torch.full(delta.shape, density, dtype=torch.float32)
    return torch.bernoulli(probabilities, generator=generator).to(delta.device, torch.bool)


def rank_random_mask(delta: torch.Tensor, density: float, epsilon: float,
                     generator: torch.Generator) -> torch.Tensor:
    """DELLA (MagPrune): keep probability rises linearly with the magnitude rank within each row,
    from density − ε for the smallest to density + ε for the largest."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    normalised = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    probabilities = (density - epsilon) + normalised.clamp(0, 1) * (2 * epsilon)
    mask = torch.bernoulli(probabilities.cpu(), generator=generator).to(delta.device, torch.bool)
    return mask.reshape(delta.shape)


def l1_rescale(total: float, kept: float, eps: float = 1e-7) -> float:
    """Factor restoring the L1 norm of a delta after masking (1 when either norm is ~0)."""
    if total < eps or kept < eps:
        return 1.0
    return total / kept
