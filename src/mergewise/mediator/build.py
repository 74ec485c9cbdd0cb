"""`mergewise mediator build`: how a Mediator model is laid out — which units to route, with which
residual code, within the memory budget — and the build itself, the recipe's merge with its stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergewise.checkpoint.files import read_jsonl, read_text
from mergewise.config import MergeConfig, Recipe
from mergewise.config import load_recipe as load_core_recipe
from mergewise.errors import MergewiseError
from mergewise.mediator.allocation import (
    THRESHOLD_OPTION,
    Allocation,
    KeptEstimate,
    RoutedTensor,
    allocate,
    largest_level,
    smallest_budget,
    too_small,
    unit_cost,
)
from mergewise.mediator.analysis import ConflictReport
from mergewise.mediator.codes import AUTO_OPTIONS, get_code
from mergewise.mediator.settings import MIN_CALIBRATION_PROMPTS, MediatorRecipe, MediatorSettings

ONE_FILE = 1 << 62  # the experts file is never sharded


@dataclass
class BuildSummary:
    out_dir: Path
    routed_units: list[str]
    units: int
    codes: dict[str, int]  # code name → routed units stored with it
    model_bytes: int
    stored_bytes: int
    budget: float | None
    heldout_accuracy: float

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.model_bytes

    def describe(self) -> str:
        budget = f" (budget {self.budget:g}×)" if self.budget is not None else ""
        codes = ", ".join(f"{count} {code}" for code, count in self.codes.items())
        return (
            f"routed {len(self.routed_units)} of {self.units} units ({codes}); "
            f"stored {self.stored_bytes / 1e6:.1f} MB = {self.ratio:.3f}× one model{budget}; "
            f"router held-out accuracy {self.heldout_accuracy:.3f}"
        )


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSONL records with a `prompt` (or `text`) field."""
    if path.suffix in (".jsonl", ".json"):
        return [
            next(record[name] for name in ("prompt", "text") if isinstance(record.get(name), str))
            for record in read_jsonl(path, "prompts file", ("prompt|text",))
        ]
    return [line for line in read_text(path, "prompts file").splitlines() if line.strip()]


def calibration_prompts(recipe: MediatorRecipe) -> dict[str, list[str]]:
    prompts = {}
    for expert in recipe.settings.experts:
        path = recipe.prompts_path(expert)
        found = read_prompts(path)
        if len(found) < MIN_CALIBRATION_PROMPTS:
            raise MergewiseError(
                f"{path}: task {expert.task!r} has {len(found)} calibration prompts; the router "
                f"needs at least {MIN_CALIBRATION_PROMPTS}"
            )
        prompts[expert.task] = found[: recipe.settings.router.max_prompts]
    return prompts


def router_reserve(settings: MediatorSettings, hidden: int) -> int:
    """A bound on the router file: prototypes, scaling, a logistic head and calibration distances."""
    tasks = len(settings.experts)
    return 4 * (2 * tasks + 3) * hidden + 4 * tasks * settings.router.max_prompts + 4096


def fixed_option(
    settings: MediatorSettings, units: dict[str, list[RoutedTensor]], available: float | None
) -> tuple[str, float | None]:
    """The (code, level) of a named code; an `auto` level is the largest at which every unit fits."""
    if settings.code == "auto":
        return THRESHOLD_OPTION
    code = get_code(settings.code)
    level = getattr(settings, code.level_setting) if code.level_setting is not None else None
    if level != "auto":
        return code.name, level
    if available is None:
        return code.name, code.threshold_level
    return code.name, largest_level(units, code.name, code.levels, available, len(settings.experts))


def estimated_options(
    settings: MediatorSettings, units: dict[str, list[RoutedTensor]], available: float | None
) -> tuple[tuple[str, float | None], ...]:
    """The options whose kept share the conflict analysis measures: every candidate of a budget."""
    if available is None:
        return ()
    return AUTO_OPTIONS if settings.code == "auto" else (fixed_option(settings, units, available),)


def choose_routing(
    settings: MediatorSettings,
    report: ConflictReport,
    estimate: KeptEstimate,
    units: dict[str, list[RoutedTensor]],
    available: float | None,
    model_bytes: int,
    fixed_bytes: int,
) -> Allocation:
    """The routed units and their codes: every unit over `route_threshold`, or (with a budget, where
    `available` is the bytes left for experts) the best-kept share that fits."""
    tasks = len(settings.experts)
    conflicts = {unit.unit: unit for unit in report.units if unit.unit in units}
    if available is None:
        threshold = settings.route_threshold
        assert threshold is not None  # no bytes are counted where units are routed by their conflict
        option = fixed_option(settings, units, None)
        routed = [name for name, unit in conflicts.items() if unit.sign_conflict >= threshold]
        if not routed:
            highest = max((unit.sign_conflict for unit in conflicts.values()), default=0.0)
            raise MergewiseError(
                f"mediator.route_threshold {settings.route_threshold:g} routes no unit "
                f"(highest sign conflict is {highest:.4f})"
            )
        return Allocation(
            {name: option for name in routed}, sum(unit_cost(units[name], *option, tasks) for name in routed)
        )
    candidates = list(estimate.options)
    gains = {(name, option): estimate.gain(name, tasks, option) for name in units for option in candidates}
    totals = {name: sum(estimate.total.get((name, task), 0.0) for task in range(tasks)) for name in units}
    allocation = allocate(units, candidates, gains, totals, available, tasks)
    if not allocation.choices:
        assert settings.memory_budget is not None  # bytes are counted against the budget
        what = "any code" if settings.code == "auto" else f"code {candidates[0][0]}"
        raise too_small(
            settings.memory_budget, smallest_budget(units, candidates, fixed_bytes, model_bytes, tasks), what
        )
    return allocation


def build(recipe_source: str | Path | dict | MergeConfig | Recipe, out_dir: str | Path, **options: Any) -> BuildSummary:
    """Build a Mediator model folder: the recipe's merge, with its `mediator:` stage (see
    `mergewise.mediator.stage`). `options` are the merge's (device, threads, shard_size, …)."""
    from mergewise.engine import run_merge

    recipe = load_core_recipe(recipe_source)
    MediatorRecipe.of(recipe)  # a recipe without a mediator block fails here
    result = run_merge(recipe, out_dir, **options)
    built = result.records["mediator"]
    codes: dict[str, int] = {}
    for unit in built["units"]:
        if unit["routed"]:
            codes[unit["code"]] = codes.get(unit["code"], 0) + 1
    return BuildSummary(
        result.out_dir,
        built["routed_units"],
        len(built["units"]),
        codes,
        built["memory"]["dense_bytes"],
        built["memory"]["stored_bytes"],
        built["memory"]["budget"],
        built["router_fit"]["heldout_accuracy"],
    )
