"""Passthrough: copy one input unchanged (optionally scaled); the building block of frankenmerges."""

from __future__ import annotations

import torch

from mergewise.methods.base import BasePolicy, MergeMethod, OptionalPerModel, TensorRows


def merge_passthrough(rows: TensorRows, *, scale: OptionalPerModel = (None,)) -> torch.Tensor:
    factor = scale[0]
    return rows.inputs[0] if factor is None else rows.inputs[0] * factor


PASSTHROUGH = MergeMethod(
    name="passthrough",
    merge_rows=merge_passthrough,
    base=BasePolicy.INPUT,
    max_inputs=1,
    defaults={"scale": None},
    description="copy a single input (use with slices for layer stacking)",
)
