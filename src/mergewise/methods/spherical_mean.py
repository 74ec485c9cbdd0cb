"""Means of several models on the hypersphere: multislerp and karcher.

Both split each input (for multislerp with a base: each task vector) into a norm and a unit vector,
average the unit vectors on the sphere and scale the result by the weighted mean norm. multislerp
takes one step: it projects the unit vectors onto the tangent space at their normalised Euclidean
mean, averages them there and maps the average back onto the sphere. karcher repeats such steps
toward the Riemannian (Karcher) mean, at most `max_iter` of them, until a step is shorter than `tol`.

Each step hangs on whole-tensor figures (norms, dot products) of vectors the step before made, so
`prepare` reads the row chunks once per figure and records the figures; the merge then redoes each
row chunk's arithmetic with them. The arithmetic is mergekit's, in its dtypes, so the roundings are
the same; so are the figures of a tensor read in one chunk (torch's own reductions). A tensor of
several chunks gets each figure from the chunks' float64 sums, rounded once to the figure's dtype:
exact, where mergekit's float32 figures carry torch's accumulation error (5e-5 of the norm of a
2 M-entry tensor), which can move a bf16 rounding (tests/methods/test_peer_mergekit.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from mergewise.methods.base import BasePolicy, ChunkedTensors, MergeMethod, PerModel, TensorRows, WorkingMemory
from mergewise.methods.slerp import interpolation_dtype

# A chunk's share of a whole-tensor figure: (torch's figure of the chunk, in the figure's dtype;
# the chunk's float64 sum behind it).
ChunkFigure = tuple[torch.Tensor, torch.Tensor]


def _whole_tensor(
    figures: Iterable[ChunkFigure], finish: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """The figure of the whole tensor: torch's own when it is one chunk, else the float64 sum of the
    chunks' sums, `finish`ed (a square root for norms) and rounded once."""
    figures = list(figures)
    if len(figures) == 1:
        return figures[0][0]
    total = sum((partial for _, partial in figures[1:]), start=figures[0][1])
    return (finish(total) if finish else total).to(figures[0][0].dtype)


def _stacked(figures: list[ChunkFigure]) -> ChunkFigure:
    """Several figures of one chunk (one per input) as one figure of stacked values."""
    values, partials = zip(*figures)
    return torch.stack(values), torch.stack(partials)


def _norm_figure(values: torch.Tensor, dtype: torch.dtype) -> ChunkFigure:
    """The norm of all of `values`, taken in `dtype` as mergekit takes it (multislerp: the working
    dtype; karcher: float32, or float64 for float64 inputs)."""
    return torch.linalg.vector_norm(values.to(dtype)), values.double().square().sum()


# ---------------------------------------------------------------------------------------- multislerp
@dataclass(frozen=True)
class MultislerpFigures:
    norms: torch.Tensor  # each input's norm, (models, 1)
    weights: torch.Tensor  # the weights, normalised if asked
    mean_norm: torch.Tensor  # norm of the weighted sum of the unit vectors
    dots: torch.Tensor | None  # each unit vector's dot with the mean, (models, 1); None: linear
    tangent_norm: torch.Tensor | None  # norm of the tangent-space average, plus eps


def _multislerp_vectors(rows: TensorRows) -> torch.Tensor:
    """The inputs, or their task vectors when there is a base, as rows of a (models, entries) matrix."""
    vectors = torch.stack(rows.inputs)
    if rows.base is not None:
        vectors -= rows.base
    return vectors.view(len(rows.inputs), -1)


def _multislerp_weights(weight: PerModel, normalize_weights: bool, like: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(weight, dtype=like.dtype, device=like.device)
    if not normalize_weights:
        return weights
    total = weights.sum()
    if total == 0:
        raise ValueError(
            "weight: weights sum to 0, so they cannot be normalised (change a weight, or normalize_weights: false)"
        )
    return weights / total


def _weighted_sum(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (vectors * weights.view(-1, 1)).sum(0)


def _unit_vectors(vectors: torch.Tensor, norms: torch.Tensor, eps: float) -> torch.Tensor:
    return vectors / (norms + eps)


def _mean_direction(units: torch.Tensor, figures: MultislerpFigures) -> torch.Tensor:
    return _weighted_sum(units, figures.weights) / figures.mean_norm


def _tangent_average(
    units: torch.Tensor, figures: MultislerpFigures, mean: torch.Tensor, dots: torch.Tensor
) -> torch.Tensor:
    """The weighted average of the unit vectors' projections onto the tangent space at `mean`."""
    return _weighted_sum(units - dots * mean, figures.weights)


def prepare_multislerp(
    tensors: ChunkedTensors, *, weight: PerModel, normalize_weights: bool = True, eps: float = 1e-8
) -> MultislerpFigures | None:
    """Four passes: the norms, then the mean's norm, the dots with the mean, the tangent average's norm."""
    if len(weight) == 1:
        return None

    def vector_chunks() -> Iterator[torch.Tensor]:
        return (_multislerp_vectors(rows) for rows in tensors.chunks())

    norms = _whole_tensor(
        (
            (vectors.norm(dim=-1, keepdim=True), vectors.double().square().sum(-1, keepdim=True))
            for vectors in vector_chunks()
        ),
        torch.sqrt,
    )
    weights = _multislerp_weights(weight, normalize_weights, norms)

    def unit_chunks() -> Iterator[torch.Tensor]:
        return (_unit_vectors(vectors, norms, eps) for vectors in vector_chunks())

    mean_norm = _whole_tensor(
        (_norm_figure(_weighted_sum(units, weights), units.dtype) for units in unit_chunks()), torch.sqrt
    )
    figures = MultislerpFigures(norms, weights, mean_norm, None, None)
    if mean_norm < eps:
        if len(weight) == 2:  # an antipodal pair: mergekit interpolates linearly
            return figures
        raise ValueError(
            "the weighted unit vectors cancel out (antipodal inputs whose weights balance); change a weight"
        )

    def dot_figure(units: torch.Tensor) -> ChunkFigure:
        products = units * _mean_direction(units, figures)
        return products.sum(-1, keepdim=True), products.double().sum(-1, keepdim=True)

    def tangent_figure(units: torch.Tensor) -> ChunkFigure:
        return _norm_figure(_tangent_average(units, figures, _mean_direction(units, figures), dots), units.dtype)

    dots = _whole_tensor(dot_figure(units) for units in unit_chunks())
    tangent_norm = _whole_tensor((tangent_figure(units) for units in unit_chunks()), torch.sqrt) + eps
    return dataclasses.replace(figures, dots=dots, tangent_norm=tangent_norm)


def merge_multislerp(
    rows: TensorRows, *, weight: PerModel, normalize_weights: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    if len(rows.inputs) == 1:
        return rows.inputs[0]
    vectors = _multislerp_vectors(rows)
    figures = rows.stats
    weights = figures.weights
    if figures.dots is None:
        merged = vectors[0] * weights[0] + vectors[1] * weights[1]
    else:
        units = _unit_vectors(vectors, figures.norms, eps)
        mean = _mean_direction(units, figures)
        tangent = _tangent_average(units, figures, mean, figures.dots)
        length = figures.tangent_norm
        average_norm = (figures.norms.squeeze(-1) * weights).sum()
        merged = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * average_norm
    merged = merged.view(rows.inputs[0].shape)
    return merged if rows.base is None else merged + rows.base


MULTISLERP = MergeMethod(
    working_memory=WorkingMemory(160, 25.1),  # measured: benchmarks/memory_estimate.py
    name="multislerp",
    merge_rows=merge_multislerp,
    prepare=prepare_multislerp,
    base=BasePolicy.OPTIONAL,
    description="weighted mean on the sphere, in the tangent space at the inputs' mean direction",
)


# ------------------------------------------------------------------------------------------ karcher
@dataclass(frozen=True)
class KarcherStep:
    """One step of the running mean toward the Karcher mean."""

    dots: list[torch.Tensor]  # each counted unit vector's cosine with the mean (working dtype)
    pulls: list[torch.Tensor | None]  # alpha·θ/sin θ for each; None where θ < tol (left out)
    length: torch.Tensor  # the step's length: the norm of the tangent vector
    renorm: torch.Tensor | None  # the stepped mean's norm; None when ≤ tol (left unnormalised)


@dataclass(frozen=True)
class KarcherPath:
    norms: torch.Tensor  # every input's norm
    counted: list[int]  # the inputs whose norm exceeds tol
    alpha: float  # their weight, equal, normalised over them
    start: torch.Tensor | None  # norm of Σ alpha·unit; None when < tol: the first unit starts
    steps: list[KarcherStep]
    scale: torch.Tensor  # Σ norm / inputs over all inputs: the result's norm


def _karcher_units(rows: TensorRows, norms: torch.Tensor, counted: list[int]) -> list[torch.Tensor]:
    return [rows.inputs[index] / norms[index] for index in counted]


def _start_sum(units: list[torch.Tensor], alpha: float) -> torch.Tensor:
    total = torch.zeros_like(units[0])
    for unit in units:
        total += alpha * unit
    return total


def _started(total: torch.Tensor, units: list[torch.Tensor], start: torch.Tensor | None) -> torch.Tensor:
    return units[0] if start is None else total / start


def _tangent(
    mean: torch.Tensor, units: list[torch.Tensor], dots: list[torch.Tensor], pulls: list[torch.Tensor | None]
) -> torch.Tensor:
    """Σ pull·(unit − cos·mean): the weighted log map of the units at `mean`, the step's direction."""
    tangent = torch.zeros_like(mean)
    for unit, dot, pull in zip(units, dots, pulls):
        if pull is not None:
            tangent += pull * (unit - dot * mean)
    return tangent


def _stepped(mean: torch.Tensor, tangent: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """The exponential map: `length` along the great circle from `mean` toward `tangent`."""
    return torch.cos(length) * mean + torch.sin(length) * (tangent / length)


def _renormed(mean: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    return mean if norm is None else mean / norm


class _RunningMean:
    """The running mean of a whole tensor, kept between `prepare_karcher`'s passes (in the working
    dtype: the only whole tensor it holds) and read and written one row chunk at a time."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.flat: torch.Tensor | None = None

    def _span(self, rows: TensorRows) -> slice:
        start = rows.first_row * math.prod(self.shape[1:])
        return slice(start, start + rows.inputs[0].numel())

    def write(self, rows: TensorRows, mean: torch.Tensor) -> None:
        if self.flat is None:
            self.flat = torch.empty(math.prod(self.shape), dtype=mean.dtype, device=mean.device)
        self.flat[self._span(rows)] = mean.reshape(-1)

    def read(self, rows: TensorRows) -> torch.Tensor:
        assert self.flat is not None  # every pass writes the rows before a later one reads them
        return self.flat[self._span(rows)].view(rows.inputs[0].shape)


def prepare_karcher(tensors: ChunkedTensors, *, max_iter: int = 10, tol: float = 1e-5) -> KarcherPath | None:
    """The norms and the start, then per step three passes: the cosines with the running mean, the
    step's length and the stepped mean's norm."""
    if max_iter < 0:
        raise ValueError(f"max_iter must be at least 0, got {max_iter}")
    if tol < 0:
        raise ValueError(f"tol must be at least 0, got {tol}")
    norms = _whole_tensor(
        (
            _stacked([_norm_figure(tensor, interpolation_dtype(tensor)) for tensor in rows.inputs])
            for rows in tensors.chunks()
        ),
        torch.sqrt,
    )
    if len(norms) == 1:
        return None
    equal = 1.0 / len(norms)
    scale = sum(equal * norm for norm in norms)
    counted = [index for index, norm in enumerate(norms) if norm.item() > tol]
    if not counted:
        return KarcherPath(norms, [], 0.0, None, [], scale)
    alpha = equal / sum([equal] * len(counted))
    means = _RunningMean(tensors.shape)

    def each_chunk(
        work: Callable[[TensorRows, list[torch.Tensor]], ChunkFigure],
        finish: Callable[[torch.Tensor], torch.Tensor] | None = torch.sqrt,
    ) -> torch.Tensor:
        return _whole_tensor((work(rows, _karcher_units(rows, norms, counted)) for rows in tensors.chunks()), finish)

    def start_sum(rows: TensorRows, units: list[torch.Tensor]) -> ChunkFigure:
        total = _start_sum(units, alpha)
        means.write(rows, total)
        return _norm_figure(total, norms.dtype)

    start_norm = each_chunk(start_sum)
    start = None if start_norm.item() < tol else start_norm
    steps: list[KarcherStep] = []

    def cosines(rows: TensorRows, units: list[torch.Tensor]) -> ChunkFigure:
        """Settle the running mean (started, or renormalised after the last step), then its cosines."""
        mean = means.read(rows)
        mean = _renormed(mean, steps[-1].renorm) if steps else _started(mean, units, start)
        means.write(rows, mean)
        return (
            torch.stack([torch.dot(mean.flatten(), unit.flatten()) for unit in units]),
            torch.stack([(mean.double() * unit.double()).sum() for unit in units]),
        )

    def tangent_length(dots: list[torch.Tensor], pulls: list[torch.Tensor | None]) -> torch.Tensor:
        return each_chunk(lambda rows, units: _norm_figure(_tangent(means.read(rows), units, dots, pulls), norms.dtype))

    def take_step(dots: list[torch.Tensor], pulls: list[torch.Tensor | None], length: torch.Tensor) -> torch.Tensor:
        """Moves the running mean along the tangent; the norm of the moved mean."""

        def step(rows: TensorRows, units: list[torch.Tensor]) -> ChunkFigure:
            mean = means.read(rows)
            stepped = _stepped(mean, _tangent(mean, units, dots, pulls), length)
            means.write(rows, stepped)
            return _norm_figure(stepped, norms.dtype)

        return each_chunk(step)

    for _ in range(max_iter):
        dots = [dot.clamp(-1.0, 1.0) for dot in each_chunk(cosines, finish=None)]
        thetas = [torch.arccos(dot) for dot in dots]
        pulls = [None if theta.item() < tol else alpha * (theta / torch.sin(theta)) for theta in thetas]
        length = tangent_length(dots, pulls)
        if length.item() < tol:
            break
        renorm = take_step(dots, pulls, length)
        steps.append(KarcherStep(dots, pulls, length, renorm if renorm.item() > tol else None))
    return KarcherPath(norms, counted, alpha, start, steps, scale)


def merge_karcher(rows: TensorRows, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Replays the recorded path on these rows."""
    path = rows.stats
    if path is None:
        return rows.inputs[0]
    if not path.counted:
        return torch.zeros_like(rows.inputs[0])
    units = _karcher_units(rows, path.norms, path.counted)
    mean = _started(_start_sum(units, path.alpha), units, path.start)
    for step in path.steps:
        mean = _renormed(_stepped(mean, _tangent(mean, units, step.dots, step.pulls), step.length), step.renorm)
    return path.scale * mean


KARCHER = MergeMethod(
    working_memory=WorkingMemory(10, 16.5),  # measured: benchmarks/memory_estimate.py
    name="karcher",
    merge_rows=merge_karcher,
    prepare=prepare_karcher,
    base=BasePolicy.INPUT,
    description="Karcher (Riemannian) mean of the models' directions, scaled by their mean norm",
)
