"""Reinforced Agent Merging (arXiv 2601.13572): ram and ramplus_tl.

An entry of a task vector (input − base) counts when its magnitude exceeds `epsilon`. An entry that
one model alone changes keeps that model's change whole; one that several change gets their mean,
instead of the diluted average over all models. ramplus_tl also scales up each model's unique
entries by 1 + r·clamp(shared / unique, 0, alpha), its counts of shared and unique entries taken over
the whole tensor (by `prepare`). mergekit's scale is float32, so ramplus_tl's sum is float32 too.
"""

from __future__ import annotations

import torch

from mergewise.methods.base import BasePolicy, ChunkedTensors, MergeMethod, TensorRows


def _counted_deltas(rows: TensorRows, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The task vectors, stacked, with entries of magnitude ≤ epsilon zeroed; which entries count;
    and for each entry, how many models change it."""
    base = rows.base
    assert base is not None  # BasePolicy.REQUIRED
    deltas = torch.stack([tensor - base for tensor in rows.inputs])
    counted = deltas.abs() > epsilon
    return deltas.mul_(counted), counted, counted.sum(dim=0)


def _merge(rows: TensorRows, epsilon: float, unique_scales: torch.Tensor | None) -> torch.Tensor:
    assert rows.base is not None  # BasePolicy.REQUIRED
    deltas, _, contributors = _counted_deltas(rows, epsilon)
    parts = deltas / contributors.clamp(min=1)  # a unique entry is divided by 1: kept exactly
    if unique_scales is not None:
        scaled = deltas * unique_scales.view(-1, *[1] * (deltas.dim() - 1))
        parts = torch.where(contributors == 1, scaled, parts)
    return rows.base + parts.sum(dim=0)


def merge_ram(rows: TensorRows, *, epsilon: float = 1e-5) -> torch.Tensor:
    return _merge(rows, epsilon, None)


def prepare_ramplus_tl(
    tensors: ChunkedTensors, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """Each model's unique-entry scale 1 + r·clamp(shared / unique, 0, alpha), in float32 as
    mergekit's (a model without unique entries divides by epsilon instead)."""
    shared_parts, unique_parts = [], []
    for rows in tensors.chunks():
        _, counted, contributors = _counted_deltas(rows, epsilon)
        counted, contributors = counted.reshape(len(counted), -1), contributors.reshape(-1)
        shared_parts.append((counted & (contributors > 1)).sum(dim=1))
        unique_parts.append((counted & (contributors == 1)).sum(dim=1))
    shared, unique = torch.stack(shared_parts).sum(dim=0), torch.stack(unique_parts).sum(dim=0)
    ratio = shared / unique.clamp(min=epsilon)
    return 1 + r * ratio.clamp(min=0, max=alpha)


def merge_ramplus_tl(rows: TensorRows, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    assert rows.base is not None  # BasePolicy.REQUIRED
    return _merge(rows, epsilon, rows.stats.to(rows.base.device))


RAM = MergeMethod(
    name="ram",
    merge_rows=merge_ram,
    base=BasePolicy.REQUIRED,
    description="entries one model changes kept whole, shared ones averaged over their models",
)
RAMPLUS_TL = MergeMethod(
    name="ramplus_tl",
    merge_rows=merge_ramplus_tl,
    prepare=prepare_ramplus_tl,
    base=BasePolicy.REQUIRED,
    mergekit_writes_float32=True,
    description="ram with each model's unique entries scaled up by its shared/unique ratio",
)
