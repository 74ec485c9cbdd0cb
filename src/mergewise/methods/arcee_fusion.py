"""Arcee Fusion: the model's value only where it changed the base most, by an importance score.

An entry's importance is |model − base| times the KL divergence of the softmax of the model's row
(last axis) from that of the base's row. Entries at or above the whole tensor's median + 1.5·IQR of
importance (Tukey's outlier fence) take the model's value; the others keep the base's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mergewise.methods.base import BasePolicy, ChunkedTensors, MergeMethod, TensorRows
from mergewise.methods.sparsify import KeepBits
from mergewise.methods.task_arithmetic import input_and_base

PROBABILITY_FLOOR = 1e-8  # added to both softmaxes, so the log ratio stays finite


def _importance(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """In the working dtype throughout, as mergekit rounds it."""
    p = torch.softmax(model, dim=-1) + PROBABILITY_FLOOR
    q = torch.softmax(base, dim=-1) + PROBABILITY_FLOOR
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * divergence


def _importances(tensors: ChunkedTensors) -> torch.Tensor:
    """Every entry's importance, flat, on the CPU. A softmax spans a whole row, so a 1-D tensor (one
    row, maybe read in several chunks) is put together first."""
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]] = ((base, model) for model, base in input_and_base(tensors, 0))
    if len(tensors.shape) == 1:
        bases, models = zip(*pairs)
        pairs = [(torch.cat(bases), torch.cat(models))]
    return torch.cat([_importance(base, model).reshape(-1).cpu() for base, model in pairs])


def prepare_arcee_fusion(tensors: ChunkedTensors) -> KeepBits:
    """The entries at or above the fence, from exact quartiles of the whole tensor's importances.

    mergekit takes the quartiles at positions ⌊q·(n − 1)⌋ of the sorted importances (NaN last), as
    here, but on tensors of over 1 M entries it sorts a random sample of 1 M of them drawn from
    torch's global generator, which no recipe seed reproduces; there the fences differ slightly.
    """
    importance = _importances(tensors)
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (importance.numel() - 1)).long()
    first, median, third = (importance.kthvalue(int(position) + 1).values for position in positions)
    return KeepBits.of_mask(importance >= median + 1.5 * (third - first))


def merge_arcee_fusion(rows: TensorRows) -> torch.Tensor:
    """base + (model − base) · mask, the mask float32 as mergekit's: a bf16 sum is rounded once, on output."""
    base = rows.base
    assert base is not None  # BasePolicy.REQUIRED
    fused = rows.stats.rows_like(rows.first_row, base).to(torch.float32)
    return base + (rows.inputs[0] - base) * fused


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    merge_rows=merge_arcee_fusion,
    prepare=prepare_arcee_fusion,
    base=BasePolicy.REQUIRED,
    min_inputs=1,
    max_inputs=1,
    mergekit_writes_float32=True,
    description="the model's entries whose importance passes median + 1.5·IQR",
)
