"""`mergewise mediator build`: how a Mediator model is laid out — which units to route, at which
density, within the memory budget — and the build itself, the recipe's merge with its Mediator stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergewise.config import load_recipe as load_core_recipe
from mergewise.errors import MergewiseError
from mergewise.mediator.analysis import ConflictReport
from mergewise.mediator.settings import MIN_CALIBRATION_PROMPTS, MediatorRecipe, MediatorSettings
from mergewise.mediator.sparse import MASK_FROM_DENSITY, stored_bytes
from mergewise.mediator.units import unit_of
from mergewise.plan import MergePlan
from mergewise.records import read_jsonl

FORMAT_VERSION = 1
AUTO_DENSITIES = sorted({step / 100 for step in range(1, 101)} | {MASK_FROM_DENSITY}, reverse=True)
HEADER_BYTES_PER_TENSOR = 96  # a stored tensor's safetensors header entry, besides its name
THRESHOLD_DENSITY = 0.1  # `density: auto` with a route_threshold has no budget to fill
ONE_FILE = 1 << 62  # the experts file is never sharded


@dataclass
class BuildSummary:
    out_dir: Path
    routed_units: list[str]
    units: int
    density: float
    model_bytes: int
    stored_bytes: int
    budget: float | None
    heldout_accuracy: float

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.model_bytes

    def describe(self) -> str:
        budget = f" (budget {self.budget:g}×)" if self.budget is not None else ""
        return (f"routed {len(self.routed_units)} of {self.units} units at density {self.density:g}; stored {self.stored_bytes / 1e6:.1f} MB = "
                f"{self.ratio:.3f}× one model{budget}; router held-out accuracy {self.heldout_accuracy:.3f}")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSONL records with a `prompt` (or `text`) field."""
    if path.suffix in (".jsonl", ".json"):
        return [next(record[name] for name in ("prompt", "text") if isinstance(record.get(name), str))
                for record in read_jsonl(path, ("prompt|text",))]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def calibration_prompts(recipe: MediatorRecipe) -> dict[str, list[str]]:
    prompts = {}
    for expert in recipe.settings.experts:
        path = recipe.prompts_path(expert)
        found = read_prompts(path)
        if len(found) < MIN_CALIBRATION_PROMPTS:
            raise MergewiseError(f"{path}: task {expert.task!r} has {len(found)} calibration prompts; the router "
                                 f"needs at least {MIN_CALIBRATION_PROMPTS}")
        prompts[expert.task] = found[:recipe.settings.router.max_prompts]
    return prompts


def unit_costs(plan: MergePlan, tasks: int, density: float) -> dict[str, int]:
    """Bytes the sparse experts of each unit would add at `density`, for all tasks together."""
    costs: dict[str, int] = {}
    for job in plan.jobs:
        if job.out_dtype.is_floating_point:
            per_task = stored_bytes(torch.Size(job.shape).numel(), density, job.out_dtype)
            per_task += 2 * (HEADER_BYTES_PER_TENSOR + len(job.name))  # values + positions entries
            costs[unit_of(job.name)] = costs.get(unit_of(job.name), 0) + per_task * tasks
    return costs


def router_reserve(settings: MediatorSettings, hidden: int) -> int:
    """A bound on the router file: prototypes, scaling, a logistic head and calibration distances."""
    tasks = len(settings.experts)
    return 4 * (2 * tasks + 3) * hidden + 4 * tasks * settings.router.max_prompts + 4096


def choose_routing(report: ConflictReport, plan: MergePlan, model_bytes: int, reserve: int,
                   settings: MediatorSettings) -> tuple[list[str], float]:
    """The routed units and the density of their sparse experts."""
    tasks = len(settings.experts)
    if settings.density != "auto":
        density = settings.density
    elif settings.route_threshold is not None:
        density = THRESHOLD_DENSITY
    else:
        available = settings.memory_budget * model_bytes - model_bytes - reserve
        density = next((candidate for candidate in AUTO_DENSITIES
                        if sum(unit_costs(plan, tasks, candidate).values()) <= available), AUTO_DENSITIES[-1])
    return select_units(report, unit_costs(plan, tasks, density), model_bytes, reserve, settings, density), density


def select_units(report: ConflictReport, costs: dict[str, int], model_bytes: int, reserve: int,
                 settings: MediatorSettings, density: float) -> list[str]:
    """The most conflicting units that fit the budget, or every unit over the threshold."""
    ranked = sorted((unit for unit in report.units if unit.unit in costs), key=lambda unit: -unit.sign_conflict)
    if settings.route_threshold is not None:
        routed = [unit.unit for unit in ranked if unit.sign_conflict >= settings.route_threshold]
        if not routed:
            highest = ranked[0].sign_conflict if ranked else 0.0
            raise MergewiseError(f"mediator.route_threshold {settings.route_threshold:g} routes no unit "
                                 f"(highest sign conflict is {highest:.4f})")
        return routed
    available = settings.memory_budget * model_bytes - model_bytes - reserve
    routed = []
    for unit in ranked:
        if costs[unit.unit] <= available:
            routed.append(unit.unit)
            available -= costs[unit.unit]
    if not routed:
        cheapest = min(costs.values())
        needed = (model_bytes + reserve + cheapest) / model_bytes
        raise MergewiseError(f"mediator.memory_budget {settings.memory_budget:g} is too small to route any unit "
                             f"at density {density:g}: the cheapest unit needs a budget of {needed:.3f}")
    return routed


def build(recipe_source, out_dir: str | Path, **options) -> BuildSummary:
    """Build a Mediator model folder: the recipe's merge, with its `mediator:` stage (see
    `mergewise.mediator.stage`). `options` are the merge's (device, threads, shard_size, …)."""
    from mergewise.engine import run_merge

    recipe = load_core_recipe(recipe_source)
    MediatorRecipe.of(recipe)  # a recipe without a mediator block fails here
    result = run_merge(recipe, out_dir, **options)
    built = result.records["mediator"]
    return BuildSummary(result.out_dir, built["routed_units"], len(built["units"]), built["density"],
                        built["memory"]["dense_bytes"], built["memory"]["stored_bytes"],
                        built["memory"]["budget"], built["router_fit"]["heldout_accuracy"])
