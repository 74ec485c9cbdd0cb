"""SCE — select, calculate, erase (arXiv 2408.07990): a TIES-like fusion whose weights come from the data.

Select keeps the `select_topk` share of entries where the task vectors vary most across the models;
calculate weighs each model by the mean square of its selected task vector; erase drops, entry by
entry, the models whose sign is not the sum's (TIES's election); the weighted mean of what is left
is added to the base. The selection and the weights are whole-tensor figures, gathered by `prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mergewise.methods.base import (
    BasePolicy,
    ChunkedTensors,
    MergeMethod,
    TensorRows,
    WorkingMemory,
    combine_chunk_sums,
)
from mergewise.methods.sparsify import KEY_TYPES, KeepBits, SelectionScratch, bf16_on_cpu, bit_patterns, sort_keys
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

    mergekit cuts with `torch.topk` over the whole tensor's variances: which of many tied bf16
    variances make the cut is the order its selection algorithm leaves them in, which
    `smallest_positions` follows on integer keys (a sixth of topk's memory, ~10× its speed).
    """
    if select_topk >= 1:
        return None
    scratch = tensors.workspace.setdefault("sce_selection", SelectionScratch())
    keys = None
    filled = nonzero = 0
    for rows in tensors.chunks():
        assert rows.base is not None  # BasePolicy.REQUIRED
        if keys is None:
            keys = scratch.buffer("keys", tensors.numel, KEY_TYPES[rows.base.element_size()])
        size = rows.base.numel()
        nonzero += _variance_keys(rows, keys[filled : filled + size])
        filled += size
    assert keys is not None  # a tensor has at least one row chunk
    from mergewise.methods.sort_order import smallest_positions  # numba: loaded by the merges that select

    # count × share as a float32 tensor product, truncated: the count mergekit rounds to
    count = int(torch.tensor(nonzero) * select_topk)
    return KeepBits(smallest_positions(keys, count, scratch.order(tensors.numel)))


def _variance_keys(rows: TensorRows, out: np.ndarray) -> int:
    """Descending sort keys of |torch.var| across the models' task vectors, into `out`; returns how
    many variances are not zero. bf16 rows on the CPU take one fused pass."""
    assert rows.base is not None
    if bf16_on_cpu(rows.base, *rows.inputs):
        from mergewise.methods import bf16_bits  # numba, as above

        stacked = torch.stack(rows.inputs).reshape(len(rows.inputs), -1).view(torch.int16).numpy()
        return int(bf16_bits.variance_keys(stacked, bit_patterns(rows.base), out))
    variances = torch.var(torch.stack(_task_vectors(rows, None)), dim=0, unbiased=False).abs_()
    sort_keys(variances, True, out)
    return int(torch.count_nonzero(variances))


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
    working_memory=WorkingMemory(160, 13.3),  # measured: benchmarks/memory_estimate.py
    name="sce",
    merge_rows=merge_sce,
    prepare=prepare_sce,
    base=BasePolicy.REQUIRED,
    description="top-variance entries, mean-square weights, majority sign, weighted mean",
)
