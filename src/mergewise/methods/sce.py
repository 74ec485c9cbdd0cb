"""SCE — select, calculate, erase (arXiv 2408.07990): a TIES-like fusion whose weights come from the data.

Select keeps the `select_topk` share of entries where the task vectors vary most across the models;
calculate weighs each model by the mean square of its selected task vector; erase drops, entry by
entry, the models whose sign is not the sum's (TIES's election); the weighted mean of what is left
is added to the base. The selection and the weights are whole-tensor figures, gathered by `prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergewise.methods.base import BasePolicy, ChunkedTensors, MergeMethod, TensorRows, combine_chunk_sums
from mergewise.methods.sparsify import KeepBits
from mergewise.methods.task_arithmetic import majority_sign_agreement, sum_over_models


@dataclass(frozen=True)
class SceStats:
    keep: KeepBits | None  # the selected entries; None: every entry
    weights: torch.Tensor  # one per model, in the working dtype


def _task_vectors(rows: TensorRows, keep: KeepBits | None) -> list[torch.Tensor]:
    assert rows.base is not None  # BasePolicy.REQUIRED
    vectors = [tensor - rows.base for tensor in rows.inputs]
    if keep is None:
        return vectors
    selected = keep.rows_like(rows.first_row, rows.base)
    return [vector.mul_(selected) for vector in vectors]


def _select(tensors: ChunkedTensors, select_topk: float) -> KeepBits | None:
    """The ⌊select_topk · (non-zero variances)⌋ entries of largest variance across the models.

    The cut is made by `torch.topk` on the CPU over the whole tensor's variances, as in mergekit: which
    of many tied bf16 variances make the cut is the order its selection algorithm leaves them in. That
    costs a copy of the variances and topk's own index memory, once per tensor.
    """
    if select_topk >= 1:
        return None
    variances = torch.cat(
        [
            torch.var(torch.stack(_task_vectors(rows, None)), dim=0, unbiased=False).reshape(-1).cpu()
            for rows in tensors.chunks()
        ]
    )
    # count × share as a float32 tensor product, truncated: the count mergekit rounds to
    count = int(torch.count_nonzero(variances) * select_topk)
    selected = torch.zeros(variances.shape, dtype=torch.bool)
    selected[torch.topk(variances.abs(), count).indices] = True
    return KeepBits.of_mask(selected)


def _model_weights(tensors: ChunkedTensors, keep: KeepBits | None) -> torch.Tensor:
    """Each model's mean square over their sum (equal shares when that is ~0), in the working dtype.

    The mean is torch's: a float32 sum (float64 for float64) divided and rounded to the working dtype,
    the sum of one chunk being torch's reduction of the same 2-D shape as mergekit's; several chunks'
    sums are added in float64 and rounded once.
    """
    parts = []
    for rows in tensors.chunks():
        vectors = torch.stack(_task_vectors(rows, keep))
        dtype = vectors.dtype
        squares = vectors.square().reshape(len(vectors), -1)
        parts.append(squares.sum(dim=1, dtype=torch.promote_types(dtype, torch.float32)))
    sums = torch.stack([combine_chunk_sums([part[model] for part in parts]) for model in range(len(parts[0]))])
    mean_squares = (sums / tensors.numel).to(dtype)
    total = mean_squares.sum().item()
    if abs(total) < 1e-6:
        return torch.ones_like(mean_squares) / len(mean_squares)
    return mean_squares / total


def prepare_sce(tensors: ChunkedTensors, *, select_topk: float = 1.0) -> SceStats:
    keep = _select(tensors, select_topk)
    return SceStats(keep, _model_weights(tensors, keep))


def merge_sce(rows: TensorRows, *, select_topk: float = 1.0, int8_mask: bool = False) -> torch.Tensor:
    """base + Σ w·τ / Σ w over the models whose selected task vector τ has the elected sign.

    `int8_mask` is accepted for config compatibility: it only chose a mask dtype to save memory.
    """
    assert rows.base is not None  # BasePolicy.REQUIRED
    vectors = _task_vectors(rows, rows.stats.keep)
    weights = rows.stats.weights.to(rows.base.device)
    kept_weights = [weight * agrees for weight, agrees in zip(weights, majority_sign_agreement(vectors))]
    merged = sum_over_models(vector * weight for vector, weight in zip(vectors, kept_weights))
    return rows.base + merged / sum_over_models(kept_weights).clamp(min=1e-6)


SCE = MergeMethod(
    name="sce",
    merge_rows=merge_sce,
    prepare=prepare_sce,
    base=BasePolicy.REQUIRED,
    description="top-variance entries, mean-square weights, majority sign, weighted mean",
)
