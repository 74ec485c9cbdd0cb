"""Sparsification primitives for task vectors: which entries of a delta survive, and the rescale.

Magnitude selection is defined on the whole tensor, so it is split in two: `magnitude_bounds` finds
the surviving magnitude band once (a partial sort of the tensor's |delta|, the fastest exact k-th
selection on CPU), and `band_mask` applies it to any row chunk. Random masks are drawn per row chunk
from generators the engine seeds by (seed, tensor, model, chunk), so a second pass sees the same mask.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np
import torch


class Sparsification(str, Enum):
    MAGNITUDE = "magnitude"                    # TIES: keep the top-k |delta|
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: drop the largest too
    RANDOM = "random"                          # DARE: Bernoulli(density)
    RANK_RANDOM = "rank_random"                # DELLA: keep probability grows with rank in the row


def magnitude_bounds(magnitudes: np.ndarray, density: float, gamma: float | None = None) -> tuple[float, float]:
    """Band [lower, upper] of |delta| that keeps a `density` share, partitioning `magnitudes` in place.

    Without gamma: the top max(1, ⌊density·n⌋) magnitudes (TIES). With gamma: the ⌊gamma·n⌋ largest
    are dropped first and ⌊density·n⌋ below them kept (breadcrumbs).
    """
    count = magnitudes.size
    if density >= 1:
        return 0.0, math.inf
    if density <= 0 or count == 0:
        return math.inf, math.inf
    if gamma is None:
        keep = max(1, int(density * count))
        position = count - keep
        magnitudes.partition(position)
        return float(magnitudes[position]), math.inf
    keep = int(density * count)
    if keep == 0:
        return math.inf, math.inf
    drop_low = max(0, count - keep - int(gamma * count))
    top = drop_low + keep - 1
    magnitudes.partition([drop_low, top])
    return float(magnitudes[drop_low]), float(magnitudes[top])


def sorted_selection_mask(magnitudes: torch.Tensor, density: float, gamma: float | None = None) -> torch.Tensor:
    """The same selection as `magnitude_bounds`, as a mask from a full sort of `magnitudes`."""
    count = magnitudes.numel()
    mask = torch.zeros(count, dtype=torch.bool)
    if density >= 1:
        return mask.fill_(True)
    if density <= 0 or count == 0:
        return mask
    if gamma is None:
        mask[torch.argsort(magnitudes, descending=True)[:max(1, int(density * count))]] = True
        return mask
    keep = int(density * count)
    drop_low = max(0, count - keep - int(gamma * count))
    mask[torch.sort(magnitudes, descending=False).indices[drop_low:drop_low + keep]] = True
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
