"""Linear: a weighted average of the inputs (the base, when given, is one more weighted input)."""

from __future__ import annotations

import torch

from mergewise.methods.base import BasePolicy, MergeMethod, PerModel, TensorRows


def merge_linear(rows: TensorRows, *, weight: PerModel, normalize: bool = True) -> torch.Tensor:
    result = torch.zeros_like(rows.inputs[0], dtype=torch.float32)
    for tensor, coefficient in zip(rows.inputs, weight):
        result.add_(tensor.float(), alpha=coefficient)
    if normalize:
        if sum(weight) == 0:
            raise ValueError("weights sum to 0, so they cannot be normalised (change a weight, or normalize: false)")
        result /= sum(weight)
    return result


LINEAR = MergeMethod(
    name="linear",
    merge_rows=merge_linear,
    base=BasePolicy.INPUT,
    description="weighted average of all models (Model Soups)",
)
