"""Spherical interpolation: slerp (base ↔ one model) and nuslerp (two models, or two task vectors).

Both interpolate along the great circle between two tensors seen as vectors; the angle needs whole-
tensor norms and a dot product, gathered by `prepare`, after which each row is a fixed linear
combination of the two inputs. slerp combines in float32 (float64 for float64 inputs), nuslerp in
the working dtype, as mergekit does.
"""

from __future__ import annotations

import torch

from mergewise.methods.base import (
    BasePolicy,
    ChunkedTensors,
    MergeMethod,
    PerModel,
    TensorRows,
    WorkingMemory,
    combine_chunk_norms,
    combine_chunk_sums,
)


def interpolation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """mergekit's slerp (and karcher) work in float32, or in float64 for float64 inputs."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------ slerp
def prepare_slerp(tensors: ChunkedTensors, *, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients of base and model: whole-tensor sums in float64, then every step from the
    norms on in the interpolation dtype, as mergekit takes them (so `1 − t` rounds as in mergekit)."""
    sums = torch.zeros(3, dtype=torch.float64)
    for rows in tensors.chunks():
        assert rows.base is not None  # BasePolicy.REQUIRED
        a, b = rows.base.double(), rows.inputs[0].double()
        sums += torch.stack([(a * a).sum(), (b * b).sum(), (a * b).sum()]).cpu()
        dtype = interpolation_dtype(rows.base)
    norms = sums[:2].sqrt().to(dtype)
    norms = torch.where(norms > 1e-8, norms, 1)
    cosine = (sums[2] / norms.double().prod()).to(dtype).clamp(-1, 1)
    linear = cosine.abs() > 0.9995
    fraction = torch.tensor(t, dtype=dtype)
    theta = torch.acos(torch.where(linear, 0, cosine))
    sin_theta = torch.sin(theta)
    first = torch.where(linear, 1 - fraction, torch.sin((1 - fraction) * theta) / sin_theta)
    second = torch.where(linear, fraction, torch.sin(fraction * theta) / sin_theta)
    return first, second


def merge_slerp(rows: TensorRows, *, t: float) -> torch.Tensor:
    assert rows.base is not None  # BasePolicy.REQUIRED
    first, second = (coefficient.to(rows.base.device) for coefficient in rows.stats)
    dtype = first.dtype
    return rows.base.to(dtype) * first + rows.inputs[0].to(dtype) * second


SLERP = MergeMethod(
    working_memory=WorkingMemory(220, 0.0),  # measured: benchmarks/memory_estimate.py
    name="slerp",
    merge_rows=merge_slerp,
    prepare=prepare_slerp,
    base=BasePolicy.REQUIRED,
    min_inputs=1,
    max_inputs=1,
    description="spherical interpolation base → model by t",
)


# ---------------------------------------------------------------------------------------- nuslerp
# nuslerp works in the working dtype throughout, as mergekit does, so its rounding matches.
def _nuslerp_pair(rows: TensorRows) -> tuple[torch.Tensor, torch.Tensor]:
    first, second = rows.inputs
    if rows.base is None:
        return first, second
    return first - rows.base, second - rows.base


def _nuslerp_fraction(weight: PerModel) -> float:
    total = sum(weight)
    return 0.5 if abs(total) < 1e-6 else weight[1] / total


def _nuslerp_combine(first: torch.Tensor, second: torch.Tensor, t: float, cosine: torch.Tensor) -> torch.Tensor:
    """Point at fraction t of the arc from `first` to `second`; the chord where they are parallel."""
    collinear = (1 - cosine.square()) <= 1e-16
    theta = torch.acos(torch.where(collinear, 0, cosine))
    arc = (torch.sin((1 - t) * theta) * first + torch.sin(t * theta) * second) / torch.sin(theta)
    return torch.where(collinear, (1 - t) * first + t * second, arc)


def prepare_nuslerp(
    tensors: ChunkedTensors, *, weight: PerModel, nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False
) -> torch.Tensor | None:
    if not nuslerp_flatten:
        return None
    norms = [
        combine_chunk_norms(list(parts))
        for parts in zip(
            *([vector.reshape(-1).norm(dim=-1) for vector in _nuslerp_pair(rows)] for rows in tensors.chunks())
        )
    ]
    norms = [norm.clamp(min=1e-7) for norm in norms]
    cosine = combine_chunk_sums(
        [
            ((first / norms[0].to(first.device)) * (second / norms[1].to(first.device))).reshape(-1).sum(dim=-1)
            for first, second in map(_nuslerp_pair, tensors.chunks())
        ]
    )
    return cosine.clamp(-1, 1)


def merge_nuslerp(
    rows: TensorRows, *, weight: PerModel, nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False
) -> torch.Tensor:
    """Without flattening, each row (or, row-wise, each column) is interpolated on its own."""
    first, second = _nuslerp_pair(rows)
    if nuslerp_flatten:
        cosine = rows.stats.to(first.device)
    else:
        axis = 0 if nuslerp_row_wise else -1
        norm_a = first.norm(dim=axis, keepdim=True).clamp(min=1e-7)
        norm_b = second.norm(dim=axis, keepdim=True).clamp(min=1e-7)
        cosine = ((first / norm_a) * (second / norm_b)).sum(dim=axis, keepdim=True).clamp(-1, 1)
    result = _nuslerp_combine(first, second, _nuslerp_fraction(weight), cosine)
    return result if rows.base is None else rows.base + result


NUSLERP = MergeMethod(
    working_memory=WorkingMemory(70, 1.7),  # measured: benchmarks/memory_estimate.py
    name="nuslerp",
    merge_rows=merge_nuslerp,
    prepare=prepare_nuslerp,
    base=BasePolicy.OPTIONAL,
    min_inputs=2,
    max_inputs=2,
    whole_tensor=lambda shared: shared["nuslerp_row_wise"] and not shared["nuslerp_flatten"],
    description="spherical interpolation of two models (or two task vectors when a base is given)",
)
