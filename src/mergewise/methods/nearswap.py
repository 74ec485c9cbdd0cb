"""NearSwap: each entry moves from the base toward the model by at most `t`.

Entries where the two differ by less than t take the model's value; where they are further apart the
base's value is kept but for a step of t toward the model. The weight t / |model − base| is computed
and applied in the working dtype, as mergekit does, so the roundings match.
"""

from __future__ import annotations

import torch

from mergewise.methods.base import BasePolicy, MergeMethod, TensorRows


def merge_nearswap(rows: TensorRows, *, t: float) -> torch.Tensor:
    base, model = rows.base, rows.inputs[0]
    assert base is not None  # BasePolicy.REQUIRED
    share = (t / (model - base).abs().clamp(min=1e-6)).clamp(0, 1)
    return share * model + (1 - share) * base


NEARSWAP = MergeMethod(
    name="nearswap",
    merge_rows=merge_nearswap,
    base=BasePolicy.REQUIRED,
    min_inputs=1,
    max_inputs=1,
    description="each entry moves from the base toward the model by at most t",
)
