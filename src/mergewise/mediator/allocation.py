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
from mergewise.mediator.codes import Part, as_matrix, get_code, matrix_shape
from mergewise.mediator.codes.spectrum import SampleSpectrum
from mergewise.mediator.units import unit_of

HEADER_BYTES_PER_PART = 96  # a stored part's safetensors header entry, besides its name
VECTOR_CODE = "full"
SAMPLED_ROWS = 512  # rows per tensor the gains are measured on (every row of smaller tensors)
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

    def stored_parts(self, code: str, level: float | None) -> dict[str, Part]:
        code, level = self.option(code, level)
        return get_code(code).layout(*matrix_shape(self.shape), self.dtype, level)

    def stored_bytes(self, code: str, level: float | None) -> int:
        return sum(part.nbytes for part in self.stored_parts(code, level).values())


def unit_cost(tensors: list[RoutedTensor], code: str, level: float | None, tasks: int) -> int:
    """Bytes all tasks' experts of a unit take in the experts file, header entries included."""
    per_task = sum(
        tensor.stored_bytes(code, level)
        + len(tensor.stored_parts(code, level)) * (HEADER_BYTES_PER_PART + len(tensor.name) + 24)
        for tensor in tensors
    )
    return per_task * tasks


@dataclass
class KeptEstimate:
    """Per (unit, task): ‖r̃‖² of every tensor, of the matrices, and of the matrices' sampled rows,
    plus each option's kept part of the sampled ‖r̃‖². A conflict-analysis observer (see
    `analysis.analyze_conflicts`); `finish()` after the last chunk.

    Row-local codes are measured chunk by chunk on the sampled rows. A low-rank code is measured on
    each matrix's sampled rows together, once the matrix is complete: their spectrum stands for the
    matrix's (a row sample's Gram matrix is the whole one's, scaled, in expectation)."""

    options: tuple[tuple[str, float | None], ...]
    shapes: dict[str, tuple[int, ...]]
    total: dict[tuple[str, int], float] = field(default_factory=dict)
    matrix_total: dict[tuple[str, int], float] = field(default_factory=dict)
    sampled: dict[tuple[str, int], float] = field(default_factory=dict)
    kept: dict[tuple[str, int, tuple[str, float | None]], float] = field(default_factory=dict)
    # The open matrix's sampled rows, per task, in one buffer each: thousands of small per-chunk
    # pieces fragmented the heap (+0.5 GB of RSS that was never returned, on a 0.2 B model).
    _samples: dict[int, torch.Tensor] = field(default_factory=dict)
    _filled: int = 0
    _open: str | None = None

    def __call__(self, name: str, rows: slice, task_vectors: torch.Tensor) -> None:
        if name != self._open:
            self.finish()
            self._open = name
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
            if self._whole_matrix_levels:
                if task not in self._samples:
                    sampled_rows = len(range(0, self.shapes[name][0], stride))
                    self._samples[task] = torch.empty(sampled_rows, sample.shape[1])
                self._samples[task][self._filled : self._filled + len(sample)] = sample
            for option in self.options:
                code = get_code(option[0])
                if not code.row_local:
                    continue
                error = sample - code.decode(code.encode(sample, torch.float32, option[1]), sample.shape[1])
                key = (unit, task, option)
                self.kept[key] = self.kept.get(key, 0.0) + sample_energy - float(error.double().square().sum())
        if len(self.shapes[name]) >= 2:
            self._filled += len(picked)

    def finish(self) -> None:
        """Measure the options that need the whole matrix (low-rank) on the open matrix's sampled rows."""
        if self._open is not None:  # rows are sampled only of an open matrix
            unit = unit_of(self._open)
            for task, sample in self._samples.items():
                spectrum = SampleSpectrum(sample[: self._filled])
                for name, levels in self._whole_matrix_levels.items():
                    kept_shares = get_code(name).kept_shares
                    assert kept_shares is not None  # every code that is not row-local estimates from a sample
                    for level, share in kept_shares(spectrum, levels).items():
                        key = (unit, task, (name, level))
                        self.kept[key] = self.kept.get(key, 0.0) + share * spectrum.energy
        self._samples.clear()
        self._filled = 0
        self._open = None

    @property
    def _whole_matrix_levels(self) -> dict[str, list[float]]:
        """Code name → its levels among the options, for codes measured once a matrix is complete."""
        levels: dict[str, list[float]] = {}
        for name, level in self.options:
            if not get_code(name).row_local:
                assert level is not None  # such codes have a level (the low-rank codes' rank)
                levels.setdefault(name, []).append(level)
        return levels

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


def allocate(
    units: dict[str, list[RoutedTensor]],
    candidates: list[tuple[str, float | None]],
    gains: dict[tuple[str, tuple[str, float | None]], float],
    totals: dict[str, float],
    available: float,
    tasks: int,
) -> Allocation:
    """The options within `available` bytes that keep the most of the worst-kept unit, then spend
    what is left where it keeps the most ‖·‖² per byte.

    On the zoo a skill came back only when every unit of the model was restored: routing fewer units
    with a better code kept more ‖θ_t − D‖² and far less of the experts' scores. So the first goal is
    the largest share s such that every unit with a residual gets an option keeping ≥ s (the cheapest
    such); only when not even the cheapest options of all units fit are units left out, most
    ‖·‖² per byte first."""
    costs = {
        (unit, option): unit_cost(tensors, *option, tasks) for unit, tensors in units.items() for option in candidates
    }
    wanted = [unit for unit in units if totals.get(unit, 0.0) > 0]
    shares = {key: gains[key] / totals[key[0]] for key in costs if key[0] in wanted}

    def cheapest_reaching(floor: float) -> dict[str, tuple[str, float | None]] | None:
        chosen = {}
        for unit in wanted:
            reaching = [option for option in candidates if shares[unit, option] >= floor]
            if not reaching:
                return None
            chosen[unit] = min(reaching, key=lambda option: (costs[unit, option], -shares[unit, option]))
        return chosen if sum(costs[unit, option] for unit, option in chosen.items()) <= available else None

    floors = sorted({share for share in shares.values()})
    low, high, best = 0, len(floors) - 1, None
    while low <= high:  # the cost of reaching a floor only grows with it
        middle = (low + high) // 2
        found = cheapest_reaching(floors[middle])
        if found is not None:
            best, low = found, middle + 1
        else:
            high = middle - 1
    chosen = best if best is not None else {}
    while True:  # upgrades (or, with nothing chosen, additions), best ‖·‖² per byte first
        spent = sum(costs[unit, option] for unit, option in chosen.items())
        steps = [
            (
                (gains[unit, option] - (gains[unit, chosen[unit]] if unit in chosen else 0.0))
                / max(costs[unit, option] - (costs[unit, chosen[unit]] if unit in chosen else 0), 1),
                unit,
                option,
            )
            for unit in wanted
            for option in candidates
            if gains[unit, option] > (gains[unit, chosen[unit]] if unit in chosen else 0.0)
            and spent + costs[unit, option] - (costs[unit, chosen[unit]] if unit in chosen else 0) <= available
        ]
        if not steps:
            break
        _, unit, option = max(steps, key=lambda step: step[0])
        chosen[unit] = option
    return Allocation(chosen, sum(costs[unit, option] for unit, option in chosen.items()))


def smallest_budget(
    units: dict[str, list[RoutedTensor]],
    candidates: list[tuple[str, float | None]],
    fixed_bytes: int,
    model_bytes: int,
    tasks: int,
) -> float:
    """The budget below which no unit can be routed by any candidate."""
    cheapest = min(unit_cost(tensors, *option, tasks) for tensors in units.values() for option in candidates)
    return (fixed_bytes + cheapest) / model_bytes


def too_small(budget: float, smallest: float, what: str) -> MergewiseError:
    return MergewiseError(
        f"mediator.memory_budget {budget:g} is too small to route any unit with {what}: "
        f"the smallest budget that routes one is {math.ceil(smallest * 1000) / 1000:.3f}"
    )


def largest_level(
    units: dict[str, list[RoutedTensor]], code: str, levels: tuple[float, ...], available: float, tasks: int
) -> float:
    """The largest level of `code` at which every unit fits (the smallest level if none does)."""
    return next(
        (
            level
            for level in levels
            if sum(unit_cost(tensors, code, level, tasks) for tensors in units.values()) <= available
        ),
        levels[-1],
    )
