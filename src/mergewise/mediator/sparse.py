"""Sparse experts: the top-ρ entries of θ_t − D per tensor, stored compactly.

An expert tensor is stored as `{task}/{name}.values` (the kept residuals in the model's dtype, in
ascending flat-index order) plus where they sit: `.indices` (int32 flat indices) when ρ ≤ 1/16,
else `.mask` (a packed bitmask, one bit per entry), whichever is smaller.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mergewise.errors import MergewiseError
from mergewise.methods.sparsify import kept_count

MASK_FROM_DENSITY = 1 / 16  # above it a bitmask (n/8 bytes) is smaller than int32 indices (4ρn bytes)


def uses_mask(density: float) -> bool:
    return density > MASK_FROM_DENSITY


def stored_shapes(numel: int, density: float, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Suffix → (shape, dtype) of the stored tensors of one expert tensor."""
    kept = kept_count(numel, density)
    position = ("mask", ((numel + 7) // 8,), torch.uint8) if uses_mask(density) else ("indices", (kept,), torch.int32)
    return {"values": ((kept,), dtype), position[0]: position[1:]}


def stored_bytes(numel: int, density: float, dtype: torch.dtype) -> int:
    return sum(math.prod(shape) * stored_dtype.itemsize
               for shape, stored_dtype in stored_shapes(numel, density, dtype).values())


def decompose(residual: torch.Tensor, density: float, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], float]:
    """The stored tensors of the top-ρ residual entries, and the share of ‖residual‖² they keep."""
    flat = residual.reshape(-1).float()
    kept = kept_count(flat.numel(), density)
    indices = torch.topk(flat.abs(), kept, sorted=False).indices.sort().values
    values = flat[indices]
    total = float(flat.double().square().sum())
    retained = float(values.double().square().sum()) / total if total > 0 else 1.0
    if uses_mask(density):
        mask = np.zeros(flat.numel(), dtype=bool)
        mask[indices.numpy()] = True
        position = {"mask": torch.from_numpy(np.packbits(mask))}
    else:
        position = {"indices": indices.to(torch.int32)}
    return {"values": values.to(dtype), **position}, retained


def flat_indices(stored: dict[str, torch.Tensor], numel: int, where: str = "expert tensor") -> torch.Tensor:
    """Flat positions of the stored values, int32 while they fit (half the memory of int64), checked
    against the format: a folder from elsewhere may hold anything."""
    dtype = torch.int32 if numel < 2**31 else torch.int64
    values = stored["values"]
    if values.dim() != 1 or not bool(torch.isfinite(values.float()).all()):
        raise MergewiseError(f"{where}: values must be one finite vector")
    if "mask" in stored:
        mask = stored["mask"]
        if mask.dtype != torch.uint8 or tuple(mask.shape) != ((numel + 7) // 8,):
            raise MergewiseError(f"{where}: mask must be {(numel + 7) // 8} bytes for {numel} entries, "
                                 f"got {mask.dtype} {list(mask.shape)}")
        bits = np.unpackbits(mask.cpu().numpy(), count=numel).view(bool)
        indices = torch.from_numpy(np.flatnonzero(bits)).to(dtype)
    elif "indices" in stored:
        indices = stored["indices"]
        if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
            raise MergewiseError(f"{where}: indices must be one integer vector")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= numel
                             or not bool((indices[1:] > indices[:-1]).all())):
            raise MergewiseError(f"{where}: indices must be ascending positions in [0, {numel})")
        indices = indices.to(dtype)
    else:
        raise MergewiseError(f"{where}: has neither indices nor a mask")
    if len(indices) != len(values):
        raise MergewiseError(f"{where}: {len(values)} values for {len(indices)} positions")
    return indices


def materialize(dense: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """D + Σ scale · S for `(flat indices, values, scale)` parts, summed in float32 and rounded once."""
    flat = dense.detach().reshape(-1).float().clone()
    for indices, values, scale in parts:
        flat.index_add_(0, indices.to(flat.device), values.to(flat.device).float(), alpha=scale)
    return flat.to(dense.dtype).reshape(dense.shape)
