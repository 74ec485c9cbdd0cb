"""Model Stock: move from the base toward the inputs' average by a ratio set by the angle between
the task vectors (the more they agree, the further)."""

from __future__ import annotations

import itertools

import torch

from mergewise.methods.base import (
    BasePolicy,
    ChunkedTensors,
    MergeMethod,
    TensorRows,
    WorkingMemory,
    combine_chunk_norms,
    combine_chunk_sums,
)


def _interpolation_ratio(norms: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
    """t = N·cos / (1 + (N−1)·cos), cos the mean pairwise cosine of the task vectors (norms in the
    last axis, dot products in the last two); where the denominator vanishes the base is kept."""
    count = norms.shape[-1]
    cosines = [
        (dots[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1)
        for i, j in itertools.combinations(range(count), 2)
    ]
    cosine = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0, count * cosine / torch.where(singular, 1, denominator))


def _task_vectors(rows: TensorRows, shape: tuple[int, ...]) -> torch.Tensor:
    assert rows.base is not None  # BasePolicy.REQUIRED
    base = rows.base.reshape(shape)
    return torch.stack([tensor.reshape(shape) - base for tensor in rows.inputs])


def prepare_model_stock(tensors: ChunkedTensors, *, filter_wise: bool = False) -> torch.Tensor | None:
    """Whole-tensor norms and dot products of the task vectors, reduced by torch in the working dtype
    as mergekit reduces them: a tensor read in one chunk gets mergekit's figures exactly; the sums of
    several chunks are added in float64 and rounded once."""
    if filter_wise:
        return None
    count = 0
    norm_parts, dot_parts = [], []
    for rows in tensors.chunks():
        vectors = _task_vectors(rows, (-1,))
        count = len(vectors)
        # one 1-D reduction per vector and pair, as mergekit's: torch's summation order depends on the shape
        norm_parts.append([vector.norm(dim=-1) for vector in vectors])
        dot_parts.append([[(vectors[i] * vectors[j]).sum(dim=-1) for j in range(count)] for i in range(count)])
    norms = torch.stack([combine_chunk_norms([part[i] for part in norm_parts]) for i in range(count)])
    dots = torch.stack(
        [
            torch.stack([combine_chunk_sums([part[i][j] for part in dot_parts]) for j in range(count)])
            for i in range(count)
        ]
    )
    return _interpolation_ratio(norms, dots)


def merge_model_stock(rows: TensorRows, *, filter_wise: bool = False) -> torch.Tensor:
    base = rows.base
    assert base is not None  # BasePolicy.REQUIRED
    if filter_wise:
        per_row = (base.shape[0], -1) if base.dim() >= 2 else (1, -1)
        vectors = _task_vectors(rows, per_row)
        dots = (vectors[:, None] * vectors[None, :]).sum(dim=-1).permute(2, 0, 1)
        ratio = _interpolation_ratio(vectors.norm(dim=-1).T, dots)
        ratio = ratio.reshape(-1, *([1] * (base.dim() - 1))) if base.dim() >= 2 else ratio.reshape(())
    else:
        ratio = rows.stats.to(base.device)
    total = rows.inputs[0]
    for tensor in rows.inputs[1:]:
        total = total + tensor
    average = total / len(rows.inputs)
    return ratio * average + (1 - ratio) * base


MODEL_STOCK = MergeMethod(
    working_memory=WorkingMemory(120, 5.7),  # measured: benchmarks/memory_estimate.py
    name="model_stock",
    merge_rows=merge_model_stock,
    prepare=prepare_model_stock,
    base=BasePolicy.REQUIRED,
    min_inputs=2,
    description="base-to-average interpolation by the task vectors' angle",
)
