"""Model Stock: move from the base toward the inputs' average by a ratio set by the angle between
the task vectors (the more they agree, the further)."""

from __future__ import annotations

import itertools

import torch

from mergewise.methods.base import BasePolicy, ChunkedTensors, MergeMethod, TensorRows


def _interpolation_ratio(gram: torch.Tensor) -> torch.Tensor:
    """t = N·cos / (1 + (N−1)·cos), cos the mean pairwise cosine of the task vectors whose Gram
    matrices fill the last two axes; where the denominator vanishes the base is kept (t = 0)."""
    count = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cosines = [(gram[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1)
               for i, j in itertools.combinations(range(count), 2)]
    cosine = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, count * cosine / torch.where(singular, 1.0, denominator))


def prepare_model_stock(tensors: ChunkedTensors, *, filter_wise: bool = False) -> torch.Tensor | None:
    """Whole-tensor Gram matrix of the task vectors, accumulated over row chunks in float64."""
    if filter_wise:
        return None
    gram = 0
    for rows in tensors.chunks():
        vectors = torch.stack([(tensor - rows.base).reshape(-1) for tensor in rows.inputs]).double()
        gram = gram + vectors @ vectors.T
    return _interpolation_ratio(gram)


def merge_model_stock(rows: TensorRows, *, filter_wise: bool = False) -> torch.Tensor:
    if filter_wise:
        as_rows = rows.base.reshape(rows.base.shape[0], -1) if rows.base.dim() >= 2 else rows.base.reshape(1, -1)
        vectors = torch.stack([tensor.reshape(as_rows.shape) - as_rows for tensor in rows.inputs])
        ratio = _interpolation_ratio(torch.einsum("irc,jrc->rij", vectors, vectors))
        ratio = ratio.reshape(-1, *([1] * (rows.base.dim() - 1))) if rows.base.dim() >= 2 else ratio.reshape(())
    else:
        ratio = rows.stats.to(rows.base.dtype)
    average = torch.stack(rows.inputs).mean(dim=0)
    return ratio * average + (1 - ratio) * rows.base


MODEL_STOCK = MergeMethod(name="model_stock", merge_rows=merge_model_stock, prepare=prepare_model_stock,
                          base=BasePolicy.REQUIRED, min_inputs=2,
                          description="base-to-average interpolation by the task vectors' angle")
