"""Which units Mediator routes and how each stores its experts, within the memory budget.

Every option is a (code, level) for a unit's matrices (its vectors are always stored `full`); its
cost is the exact stored bytes of all tasks, its gain the share of ‖θ_t − D‖² it keeps, summed over
tasks. The gains come from the conflict analysis pass, before D exists, on the proxy residual
τ_t − mean_s τ_s (exactly θ_t − D when D is the experts' linear average), measured on a sample of
each tensor's rows. `code: auto` then solves the choice as a multiple-choice knapsack: the greedy
walk along each unit's upper convex hull of (cost, gain), best gain per byte first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mergewise.errors import MergewiseError
from mergewise.mediator.codes import as_matrix, get_code, matrix_shape
from mergewise.mediator.units import unit_of

HEADER_BYTES_PER_PART = 96  # a stored part's safetensors header entry, besides its name
VECTOR_CODE = "full"
SAMPLED_ROWS = 512  # rows per tensor the gains are measured on (every row of smaller tensors)
AUTO_OPTIONS: tuple[tuple[str, float | None], ...] = (
    ("sign1", None), ("sign2", None),
    ("sparse", 0.03), ("sparse", 0.0625), ("sparse", 0.125), ("sparse", 0.25),
)
SPARSE_LEVELS = tuple(sorted({step / 100 for step in range(1, 101)} | {0.0625}, reverse=True))
LOWRANK_LEVELS = tuple(sorted({2 ** power for power in range(13)} | {3 * 2 ** power for power in range(12)},
                              reverse=True))
THRESHOLD_OPTION = ("sign2", None)  # `route_threshold` with `code: auto`: the best 2-bit code measured


@dataclass(frozen=True)
class RoutedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def is_vector(self) -> bool:
        return len(self.shape) < 2

    def option(self, code: str, level: float | None) -> tuple[str, float | None]:
        return (VECTOR_CODE, None) if self.is_vector else (code, level)

    def stored_parts(self, code: str, level: float | None):
        code, level = self.option(code, level)
        return get_code(code).layout(*matrix_shape(self.shape), self.dtype, level)

    def stored_bytes(self, code: str, level: float | None) -> int:
        return sum(part.nbytes for part in self.stored_parts(code, level).values())


def unit_cost(tensors: list[RoutedTensor], code: str, level: float | None, tasks: int) -> int:
    """Bytes all tasks' experts of a unit take in the experts file, header entries included."""
    per_task = sum(tensor.stored_bytes(code, level)
                   + len(tensor.stored_parts(code, level)) * (HEADER_BYTES_PER_PART + len(tensor.name) + 24)
                   for tensor in tensors)
    return per_task * tasks


@dataclass
class KeptEstimate:
    """Per (unit, task): ‖r̃‖² of every tensor, of the matrices, and of the matrices' sampled rows,
    plus each option's kept part of the sampled ‖r̃‖². A conflict-analysis observer (see
    `analysis.analyze_conflicts`)."""

    options: tuple[tuple[str, float | None], ...]
    shapes: dict[str, tuple[int, ...]]
    total: dict[tuple[str, int], float] = field(default_factory=dict)
    matrix_total: dict[tuple[str, int], float] = field(default_factory=dict)
    sampled: dict[tuple[str, int], float] = field(default_factory=dict)
    kept: dict[tuple[str, int, tuple[str, float | None]], float] = field(default_factory=dict)

    def __call__(self, name: str, rows: slice, task_vectors: torch.Tensor) -> None:
        unit = unit_of(name)
        residuals = task_vectors - task_vectors.mean(0, keepdim=True)
        first = rows.start or 0
        stride = max(1, math.ceil(self.shapes[name][0] / SAMPLED_ROWS)) if len(self.shapes[name]) >= 2 else 1
        picked = torch.arange((-first) % stride, residuals.shape[1], stride)
        for task, residual in enumerate(residuals):
            energy = float(residual.double().square().sum())
            self.total[unit, task] = self.total.get((unit, task), 0.0) + energy
            if len(self.shapes[name]) < 2:  # vectors are stored losslessly
                continue
            self.matrix_total[unit, task] = self.matrix_total.get((unit, task), 0.0) + energy
            if not len(picked):  # a chunk between two sampled rows
                continue
            sample = as_matrix(residual[picked])
            sample_energy = float(sample.double().square().sum())
            self.sampled[unit, task] = self.sampled.get((unit, task), 0.0) + sample_energy
            for option in self.options:
                code = get_code(option[0])
                error = sample - code.decode(code.encode(sample, torch.float32, option[1]), sample.shape[1])
                key = (unit, task, option)
                self.kept[key] = self.kept.get(key, 0.0) + sample_energy - float(error.double().square().sum())

    def gain(self, unit: str, tasks: int, option: tuple[str, float | None]) -> float:
        """The estimated ‖·‖² an option keeps in a unit, over all tasks."""
        return sum(self._kept(unit, task, option) for task in range(tasks))

    def share(self, unit: str, task: int, option: tuple[str, float | None]) -> float:
        total = self.total.get((unit, task), 0.0)
        return self._kept(unit, task, option) / total if total > 0 else 1.0

    def _kept(self, unit: str, task: int, option: tuple[str, float | None]) -> float:
        """Matrices: the sampled rows' kept share times their whole ‖r̃‖²; vectors: kept whole."""
        total, sampled = self.total.get((unit, task), 0.0), self.sampled.get((unit, task), 0.0)
        matrices = self.matrix_total.get((unit, task), 0.0)
        kept = self.kept.get((unit, task, option), 0.0)
        return (total - matrices) + (kept / sampled * matrices if sampled > 0 else 0.0)


@dataclass(frozen=True)
class Allocation:
    """The routed units, each with its (code, level)."""

    choices: dict[str, tuple[str, float | None]]
    stored_bytes: int


def allocate(units: dict[str, list[RoutedTensor]], candidates: list[tuple[str, float | None]],
             gains: dict[tuple[str, tuple[str, float | None]], float], available: float, tasks: int) -> Allocation:
    """The options maximising the summed gain with the summed cost within `available` bytes: each
    unit's options on the upper convex hull of (cost, gain) from (0, 0), and hull steps taken in
    order of gain per byte while they fit (a unit's later steps wait for its earlier ones)."""
    steps = []
    for unit, tensors in units.items():
        points = sorted(((unit_cost(tensors, *option, tasks), gains[unit, option], option) for option in candidates),
                        key=lambda point: (point[0], -point[1]))
        hull = [(0, 0.0, None)]
        for cost, gain, option in points:
            if gain <= hull[-1][1]:
                continue
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], (cost, gain)):
                hull.pop()
            hull.append((cost, gain, option))
        steps += [(_slope(before, after), order, unit, after) for order, (before, after)
                  in enumerate(zip(hull, hull[1:]))]
    steps.sort(key=lambda step: (-step[0], step[1]))
    chosen: dict[str, tuple[int, float, tuple[str, float | None]]] = {}
    blocked: set[str] = set()
    spent = 0
    for _, _, unit, (cost, gain, option) in steps:
        if unit in blocked:
            continue
        extra = cost - (chosen[unit][0] if unit in chosen else 0)
        if spent + extra > available:
            blocked.add(unit)
            continue
        chosen[unit] = (cost, gain, option)
        spent += extra
    return Allocation({unit: option for unit, (_, _, option) in chosen.items()}, spent)


def _slope(before, after) -> float:
    return (after[1] - before[1]) / max(after[0] - before[0], 1)


def smallest_budget(units: dict[str, list[RoutedTensor]], candidates: list[tuple[str, float | None]],
                    fixed_bytes: int, model_bytes: int, tasks: int) -> float:
    """The budget below which no unit can be routed by any candidate."""
    cheapest = min(unit_cost(tensors, *option, tasks) for tensors in units.values() for option in candidates)
    return (fixed_bytes + cheapest) / model_bytes


def too_small(budget: float, smallest: float, what: str) -> MergewiseError:
    return MergewiseError(f"mediator.memory_budget {budget:g} is too small to route any unit with {what}: "
                          f"the smallest budget that routes one is {math.ceil(smallest * 1000) / 1000:.3f}")


def largest_level(units: dict[str, list[RoutedTensor]], code: str, levels: tuple[float, ...], available: float,
                  tasks: int) -> float:
    """The largest level of `code` at which every unit fits (the smallest level if none does)."""
    return next((level for level in levels
                 if sum(unit_cost(tensors, code, level, tasks) for tensors in units.values()) <= available),
                levels[-1])

