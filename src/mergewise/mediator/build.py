"""`mergewise mediator build`: dense merge + sparse per-task experts + fitted router, one folder.

Three streamed passes: the conflict analysis (which units to route), the core merge writing the
dense model D (a tensor hook turns each routed tensor of D into the experts' top-ρ residuals as
soon as it is complete), then the router is fitted on the finished dense model's features of each
expert's calibration prompts. Only one tensor of D and one of one expert are held at a time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergewise.checkpoint import PlannedTensor, StreamingShardWriter, check_output_location
from mergewise.engine import MergeOptions, execute_plan
from mergewise.errors import MergewiseError
from mergewise.mediator.analysis import ConflictReport, analyze_conflicts
from mergewise.mediator.router import Router
from mergewise.mediator.runtime import EXPERTS_FILE, MANIFEST_FILE, MEDIATOR_FOLDER, ROUTER_FILE, load
from mergewise.mediator.settings import MIN_CALIBRATION_PROMPTS, MediatorRecipe, MediatorSettings, load_recipe
from mergewise.mediator.sparse import MASK_FROM_DENSITY, decompose, stored_bytes, stored_shapes, uses_mask
from mergewise.mediator.units import expert_plan, unit_of
from mergewise.plan import MergePlan, TensorJob, build_plan

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
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".json"):
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MergewiseError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise MergewiseError(f"{path}:{number}: expected an object with a string 'prompt' field")
        prompts.append(text)
    return prompts


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


class SparseExpertHook:
    """Collects each routed tensor of D as its row chunks are merged; once complete, writes every
    expert's top-ρ residual θ_t − D (D as stored, so D + S_t is the closest to θ_t)."""

    def __init__(self, routed: list[TensorJob], experts: MergePlan, tasks: list[str], density: float,
                 writer: StreamingShardWriter):
        self.routed = {job.name: job for job in routed}
        self.expert_jobs = {job.name: job for job in experts.jobs}
        self.tasks = tasks
        self.density = density
        self.writer = writer
        self.pending: dict[str, torch.Tensor] = {}
        self.retained: dict[tuple[str, str], list[float]] = {}  # (unit, task) → [kept, total] ‖·‖²

    def __call__(self, job: TensorJob, rows: slice, merged: torch.Tensor) -> torch.Tensor:
        if job.name in self.routed:
            dense = self.pending.setdefault(job.name, torch.empty(job.shape, dtype=job.out_dtype))
            dense[rows] = merged.to(job.out_dtype)
            if not job.shape or rows.stop is None or rows.stop >= job.shape[0]:
                self._write_experts(job, self.pending.pop(job.name))
        return merged

    def _write_experts(self, job: TensorJob, dense: torch.Tensor) -> None:
        expert_job = self.expert_jobs[job.name]
        for task, source in zip(self.tasks, expert_job.inputs):
            residual = source.model.read(source.name).float() - dense.float()
            stored, retained = decompose(residual, self.density, job.out_dtype)
            for suffix, tensor in stored.items():
                self.writer.write(f"{task}/{job.name}.{suffix}", tensor)
            total = float(residual.double().square().sum())
            sums = self.retained.setdefault((unit_of(job.name), task), [0.0, 0.0])
            sums[0] += retained * total
            sums[1] += total

    def retained_share(self, unit: str, task: str) -> float:
        kept, total = self.retained.get((unit, task), (0.0, 0.0))
        return kept / total if total > 0 else 1.0


def build(config_source, out_dir: str | Path, *, device: str = "cpu", threads: int | None = None,
          shard_size: str | int = "5GB", overwrite: bool = False, seed: int | None = None,
          quiet: bool = False) -> BuildSummary:
    recipe = load_recipe(config_source)
    settings = recipe.settings
    prompts = calibration_prompts(recipe)
    experts = expert_plan(recipe)
    plan = build_plan(recipe.merge, recipe.config_dir)
    out_dir = Path(out_dir).expanduser().resolve()
    check_output_location(out_dir, [model.path for model in plan.models + experts.models], overwrite)
    report = analyze_conflicts(recipe, quiet=quiet)
    model_bytes = sum(torch.Size(job.shape).numel() * job.out_dtype.itemsize for job in plan.jobs)
    hidden = int(plan.reference.config.get("hidden_size") or plan.reference.config.get("n_embd") or 4096)
    routed_units, density = choose_routing(report, plan, model_bytes, router_reserve(settings, hidden), settings)
    routed_jobs = [job for job in plan.jobs if job.out_dtype.is_floating_point and unit_of(job.name) in routed_units]
    planned = [PlannedTensor(f"{task}/{job.name}.{suffix}", shape, dtype)
               for task in settings.tasks for job in routed_jobs
               for suffix, (shape, dtype) in stored_shapes(torch.Size(job.shape).numel(), density,
                                                             job.out_dtype).items()]
    summary: dict = {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.experts-", dir=out_dir.parent) as scratch:
        writer = StreamingShardWriter(Path(scratch), planned, ONE_FILE, {"mediator_format": str(FORMAT_VERSION)},
                                      file_stem=Path(EXPERTS_FILE).stem)
        hook = SparseExpertHook(routed_jobs, experts, settings.tasks, density, writer)

        def finalize(staging: Path) -> None:
            writer.close()
            dense = load(staging, device, dtype=torch.float32)  # still a plain folder: every unit is D
            features = {task: dense.features(dense.encode(texts), settings.router.feature_layer,
                                             settings.router.max_tokens) for task, texts in prompts.items()}
            router, fit = Router.fit(features, settings.router)
            folder = staging / MEDIATOR_FOLDER
            folder.mkdir()
            shutil.move(Path(scratch) / EXPERTS_FILE, folder / EXPERTS_FILE)
            save_file(router.state_dict(), folder / ROUTER_FILE)
            stored = sum(file.stat().st_size for file in staging.rglob("*.safetensors"))
            dense_bytes = sum(file.stat().st_size for file in staging.glob("*.safetensors"))
            manifest = _manifest(recipe, report, routed_units, routed_jobs, hook, router, fit, prompts,
                                 dense_bytes, stored)
            (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            summary.update(stored=stored, dense=dense_bytes, accuracy=fit.heldout_accuracy)

        try:
            execute_plan(plan, out_dir, MergeOptions(device=device, threads=threads, shard_size=shard_size,
                                                     overwrite=overwrite, seed=seed, quiet=quiet),
                         tensor_hook=hook, extra_record={"mediator": settings.model_dump(mode="json")},
                         finalize=finalize)
        finally:
            writer.abort()
            for model in experts.models:
                model.close()
    return BuildSummary(out_dir, routed_units, len(report.units), density, summary["dense"], summary["stored"],
                        settings.memory_budget, summary["accuracy"])


def _manifest(recipe: MediatorRecipe, report: ConflictReport, routed_units: list[str], routed_jobs: list[TensorJob],
              hook: SparseExpertHook, router: Router, fit, prompts: dict[str, list[str]], dense_bytes: int,
              stored: int) -> dict:
    from mergewise import __version__

    settings = recipe.settings
    return {
        "format": FORMAT_VERSION,
        "mergewise_version": __version__,
        "tasks": settings.tasks,
        "merge_method": recipe.merge.merge_method,
        "density": hook.density,
        "storage": "mask" if uses_mask(hook.density) else "indices",
        "routed_units": routed_units,
        "routed_tensors": [job.name for job in routed_jobs],
        "units": [{"unit": unit.unit, "parameters": unit.parameters, "sign_conflict": unit.sign_conflict,
                   "cancellation": unit.cancellation, "routed": unit.unit in routed_units,
                   "retained": {task: round(hook.retained_share(unit.unit, task), 6) for task in settings.tasks}
                   if unit.unit in routed_units else None}
                  for unit in report.units],
        "memory": {"dense_bytes": dense_bytes, "stored_bytes": stored, "ratio": round(stored / dense_bytes, 4),
                   "budget": settings.memory_budget},
        "prompts": {task: len(texts) for task, texts in prompts.items()},
        "router": router.metadata(),
        "router_fit": asdict(fit),
        "settings": settings.model_dump(mode="json"),
    }
