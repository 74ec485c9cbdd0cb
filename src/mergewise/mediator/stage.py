"""The `mediator:` block of a recipe as a stage of the streaming merge.

    on_plan     the conflict analysis (one streamed pass over the experts) chooses the routed units
                and their density within the memory budget, and lays out the experts file;
    on_tensor   each finished routed tensor of the dense model D (after AIM, if the recipe has it),
                read back from the staged output, becomes every expert's top-ρ residual θ_t − D;
    finalize    the router is fitted on the finished D's features of each expert's calibration
                prompts, and the manifest written; its content is the stage's result.

Only one tensor of D and one of one expert are held at a time.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergewise.checkpoint import PlannedTensor, StreamingShardWriter
from mergewise.config import Recipe
from mergewise.mediator.analysis import analyze_conflicts
from mergewise.mediator.build import (
    FORMAT_VERSION,
    ONE_FILE,
    calibration_prompts,
    choose_routing,
    router_reserve,
)
from mergewise.mediator.router import Router
from mergewise.mediator.runtime import EXPERTS_FILE, MANIFEST_FILE, MEDIATOR_FOLDER, ROUTER_FILE, load
from mergewise.mediator.settings import MediatorRecipe, MediatorSettings, experts_as_models
from mergewise.mediator.sparse import decompose, stored_shapes, uses_mask
from mergewise.mediator.units import ExpertTensors, expert_tensors, unit_of
from mergewise.plan import TensorJob
from mergewise.stages import BlockSpec, Stage, StageContext

# The experts file is written here inside the staged output, and moved into `mediator/` only once the
# router is fitted: until then the folder must load as the plain dense model.
BUILDING_FOLDER = ".mediator-building"


class MediatorStage(Stage):
    name = "mediator"

    def __init__(self, settings: MediatorSettings, recipe: Recipe):
        self.recipe = MediatorRecipe.of(recipe)
        self.settings = settings
        self.writer: StreamingShardWriter | None = None
        self.experts: ExpertTensors | None = None
        self.retained: dict[tuple[str, str], list[float]] = {}  # (unit, task) → [kept, total] ‖·‖²

    def on_plan(self, context: StageContext) -> None:
        recipe, settings, plan = self.recipe, self.settings, context.plan
        self.device = context.device
        self.prompts = calibration_prompts(recipe)
        self.experts = expert_tensors(recipe)
        self.report = analyze_conflicts(recipe, quiet=context.quiet)
        model_bytes = sum(torch.Size(job.shape).numel() * job.out_dtype.itemsize for job in plan.jobs)
        hidden = int(plan.reference.config.get("hidden_size") or plan.reference.config.get("n_embd") or 4096)
        self.routed_units, self.density = choose_routing(self.report, plan, model_bytes,
                                                         router_reserve(settings, hidden), settings)
        self.routed_jobs = {job.name: job for job in plan.jobs
                            if job.out_dtype.is_floating_point and unit_of(job.name) in self.routed_units}
        self.expert_jobs = {job.name: job for job in self.experts.jobs}
        planned = [PlannedTensor(f"{task}/{job.name}.{suffix}", shape, dtype)
                   for task in settings.tasks for job in self.routed_jobs.values()
                   for suffix, (shape, dtype) in stored_shapes(torch.Size(job.shape).numel(), self.density,
                                                                 job.out_dtype).items()]
        self.building = context.staging / BUILDING_FOLDER
        self.building.mkdir()
        self.writer = StreamingShardWriter(self.building, planned, ONE_FILE,
                                           {"mediator_format": str(FORMAT_VERSION)}, file_stem=Path(EXPERTS_FILE).stem)

    def wants_tensor(self, job: TensorJob) -> bool:
        return job.name in self.routed_jobs

    def on_tensor(self, job: TensorJob, dense: torch.Tensor) -> None:
        """Every expert's residual against D as stored, so that D + S_t is the closest to θ_t."""
        for task, source in zip(self.settings.tasks, self.expert_jobs[job.name].inputs):
            residual = source.model.read(source.name).float() - dense.float()
            stored, retained = decompose(residual, self.density, job.out_dtype)
            for suffix, tensor in stored.items():
                self.writer.write(f"{task}/{job.name}.{suffix}", tensor)
            total = float(residual.double().square().sum())
            sums = self.retained.setdefault((unit_of(job.name), task), [0.0, 0.0])
            sums[0] += retained * total
            sums[1] += total

    def finalize(self, staging: Path) -> dict:
        self.writer.close()
        dense = load(staging, str(self.device), dtype=torch.float32)  # still a plain folder: every unit is D
        router_settings = self.settings.router
        features = {task: dense.features(dense.encode(texts), router_settings.feature_layer,
                                         router_settings.max_tokens) for task, texts in self.prompts.items()}
        del dense
        router, fit = Router.fit(features, router_settings)
        folder = staging / MEDIATOR_FOLDER
        folder.mkdir()
        shutil.move(self.building / EXPERTS_FILE, folder / EXPERTS_FILE)
        self.building.rmdir()
        save_file(router.state_dict(), folder / ROUTER_FILE)
        stored = sum(file.stat().st_size for file in staging.rglob("*.safetensors"))
        dense_bytes = sum(file.stat().st_size for file in staging.glob("*.safetensors"))
        manifest = self._manifest(router, fit, dense_bytes, stored)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    def close(self) -> None:
        for model in self.experts.models if self.experts is not None else ():
            model.close()

    def _retained_share(self, unit: str, task: str) -> float:
        kept, total = self.retained.get((unit, task), (0.0, 0.0))
        return kept / total if total > 0 else 1.0

    def _manifest(self, router: Router, fit, dense_bytes: int, stored: int) -> dict:
        from mergewise import __version__

        settings, report = self.settings, self.report
        return {
            "format": FORMAT_VERSION,
            "mergewise_version": __version__,
            "tasks": settings.tasks,
            "merge_method": self.recipe.merge.merge_method,
            "density": self.density,
            "storage": "mask" if uses_mask(self.density) else "indices",
            "routed_units": self.routed_units,
            "routed_tensors": list(self.routed_jobs),
            "units": [{"unit": unit.unit, "parameters": unit.parameters, "sign_conflict": unit.sign_conflict,
                       "cancellation": unit.cancellation, "routed": unit.unit in self.routed_units,
                       "retained": {task: round(self._retained_share(unit.unit, task), 6) for task in settings.tasks}
                       if unit.unit in self.routed_units else None}
                      for unit in report.units],
            "memory": {"dense_bytes": dense_bytes, "stored_bytes": stored, "ratio": round(stored / dense_bytes, 4),
                       "budget": settings.memory_budget},
            "prompts": {task: len(texts) for task, texts in self.prompts.items()},
            "router": router.metadata(),
            "router_fit": asdict(fit),
            "settings": settings.model_dump(mode="json"),
        }


BLOCK = BlockSpec(schema=MediatorSettings, make_stage=MediatorStage, rewrite_recipe=experts_as_models)
