"""One tensor merged in memory exactly as a merge writes it, for callers that hold their tensors
already (tests, notebooks): the engine's row chunks, `prepare` pass and random streams, without
model folders or a recipe."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mergewise.chunking import CHUNK_ELEMENTS, row_ranges
from mergewise.errors import MergewiseError
from mergewise.methods.base import (
    REQUIRED,
    ChunkedTensors,
    MergeMethod,
    TensorRows,
    chunk_generator,
    close_workspace,
)
from mergewise.methods.registry import get_method


def merge_tensors(
    name: str,
    base: torch.Tensor | None,
    inputs: Sequence[torch.Tensor],
    *,
    seed: int = 0,
    tensor: str = "tensor",
    chunk_elements: int = CHUNK_ELEMENTS,
    **params: Any,
) -> torch.Tensor:
    """Merge `inputs` (onto `base`, for methods that take one) with method `name`.

    `params` are the method's parameters as a recipe names them (`weight`, `density`, `lambda`…):
    a per-model one is one value for every input or a sequence of one per input; those not given
    take the method's defaults. The result is what `mergewise merge` writes for a tensor called
    `tensor` with `--seed seed`, in the inputs' dtype (a recipe's `dtype` is the dtype they are
    read in), before it is cast to the output's dtype.

        merged = merge_tensors("ties", base, [a, b], weight=[0.6, 0.4], density=0.5)
    """
    method = get_method(name)
    if not inputs:
        raise MergewiseError(f"{name}: give at least one input tensor")
    params = _resolved(method, len(inputs), params)
    shape = tuple(inputs[0].shape)
    ranges = row_ranges(shape, whole=method.whole_tensor(params), chunk_elements=chunk_elements)

    def chunks(models: list[int] | None = None) -> Iterator[TensorRows]:
        chosen = range(len(inputs)) if models is None else models
        for rows in ranges:
            first_row = rows.start or 0
            yield TensorRows(
                None if base is None else _rows(base, rows),
                [_rows(inputs[i], rows) for i in chosen],
                first_row,
                rng=functools.partial(chunk_generator, seed, tensor, first_row=first_row),
            )

    workspace: dict[str, Any] = {}
    try:
        stats = (
            method.run_prepare(ChunkedTensors(shape, chunks, workspace), params) if method.prepare is not None else None
        )
        merged = []
        for rows in chunks():
            rows.stats = stats
            merged.append(method.merge(rows, params))
    finally:
        close_workspace(workspace)
    return torch.cat(merged) if shape else merged[0]


def _rows(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
    return tensor if tensor.dim() == 0 else tensor[rows]


def _resolved(method: MergeMethod, count: int, given: dict[str, Any]) -> dict[str, Any]:
    """Every parameter of `method` for `count` inputs: as given, else its default."""
    unknown = sorted(set(given) - set(method.parameters))
    if unknown:
        raise MergewiseError(
            f"{method.name}: unknown parameter {unknown[0]!r}; it takes {', '.join(method.parameters) or 'none'}"
        )
    params = {}
    for parameter in method.parameters.values():
        value = given.get(parameter.name, parameter.default)
        if value is REQUIRED:
            raise MergewiseError(f"{method.name}: missing required parameter {parameter.name}")
        if parameter.per_model:
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * count
        params[parameter.name] = value
    return params
