"""The `mediator:` block of a recipe as a stage of the streaming merge.

    on_plan     the conflict analysis (one streamed pass over the experts, which also measures what
                each residual code would keep) chooses the routed units and their codes within the
                memory budget, and lays out the experts file;
    on_tensor   each finished routed tensor of the dense model D (after AIM, if the recipe has it),
                read back from the staged output a row chunk at a time, becomes every expert's
                coded residual θ_t − D (codes that need whole matrices read them chunk by chunk);
    finalize    the router is fitted on features of each expert's calibration prompts, from a
                layer-by-layer pass over the finished D in its own dtype, and the manifest written;
                its content is the stage's result.

Only one tensor of D and a row chunk of one expert are held at a time.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from mergewise._version import __version__
from mergewise.checkpoint import PlannedTensor, StreamingShardWriter
from mergewise.checkpoint.pretrained import load_pretrained
from mergewise.checkpoint.writer import save_tensors, write_text
from mergewise.chunking import row_ranges
from mergewise.config import Recipe
from mergewise.errors import MergewiseError
from mergewise.layerwise import hidden_state_index, pooled_hidden_states
from mergewise.mediator.allocation import KeptEstimate, RoutedTensor
from mergewise.mediator.analysis import UnitConflict, analyze_conflicts
from mergewise.mediator.build import (
    ONE_FILE,
    calibration_prompts,
    choose_routing,
    estimated_options,
    router_reserve,
)
from mergewise.mediator.codes import as_matrix, get_code, matrix_shape
from mergewise.mediator.router import FitReport, Router, RouterWarning
from mergewise.mediator.runtime import (
    EXPERTS_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MEDIATOR_FOLDER,
    ROUTER_FILE,
    encode_prompts,
)
from mergewise.mediator.settings import MediatorRecipe, MediatorSettings, experts_as_models
from mergewise.mediator.units import ExpertTensors, expert_tensors, unit_of
from mergewise.plan import TensorJob, TensorSource
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

    def inputs(self) -> list[Path]:
        return [self.recipe.prompts_path(expert) for expert in self.settings.experts]

    def on_plan(self, context: StageContext) -> None:
        from mergewise.structure import language_model_tensors

        recipe, settings, plan = self.recipe, self.settings, context.plan
        depth = plan.reference.declared.text.depth  # the router reads D's hidden states by this depth
        if depth is None:
            raise MergewiseError(
                f"{plan.reference.path / 'config.json'}: gives no decoder depth (nor does its text_config); "
                "Mediator routes causal language models"
            )
        for number in settings.router.hidden_states(depth):
            hidden_state_index(number, depth, f"{recipe.origin}: mediator.router.feature_layers")
        self.device = context.device
        self.quiet = context.quiet
        self.chunk_elements = context.chunk_elements
        self.prompts = calibration_prompts(recipe)
        self.experts = expert_tensors(recipe)
        units: dict[str, list[RoutedTensor]] = {}
        language = language_model_tensors(plan.reference)  # a vision tower is merged, never routed
        for job in plan.jobs:
            if job.out_dtype.is_floating_point and job.name in language:
                units.setdefault(unit_of(job.name), []).append(RoutedTensor(job.name, tuple(job.shape), job.out_dtype))
        model_bytes = sum(torch.Size(job.shape).numel() * job.out_dtype.itemsize for job in plan.jobs)
        hidden = int(plan.reference.config.get("hidden_size") or plan.reference.config.get("n_embd") or 4096)
        fixed_bytes = model_bytes + router_reserve(settings, hidden)
        budget = settings.memory_budget  # None where units are routed by their conflict (route_threshold)
        available = None if budget is None else budget * model_bytes - fixed_bytes
        options = estimated_options(settings, units, available)
        shapes = {tensor.name: tensor.shape for tensors in units.values() for tensor in tensors}
        self.estimate = KeptEstimate(options, shapes)
        self.report = analyze_conflicts(
            recipe,
            quiet=context.quiet,
            observers=[self.estimate] if options else (),
            chunk_elements=context.chunk_elements,
            language=language,
        )
        self.estimate.finish()
        self.allocation = choose_routing(
            settings, self.report, self.estimate, units, available, model_bytes, fixed_bytes
        )
        self.routed = {
            tensor.name: (tensor, tensor.option(*self.allocation.choices[unit]))
            for unit, tensors in units.items()
            if unit in self.allocation.choices
            for tensor in tensors
        }
        self.expert_jobs = {job.name: job for job in self.experts.jobs}
        planned = [
            PlannedTensor(f"{task}/{name}.{suffix}", part.shape, part.dtype)
            for task in settings.tasks
            for name, (tensor, (code, level)) in self.routed.items()
            for suffix, part in get_code(code).layout(*matrix_shape(tensor.shape), tensor.dtype, level).items()
        ]
        self.building = context.staging / BUILDING_FOLDER
        self.building.mkdir()
        self.writer = StreamingShardWriter(
            self.building,
            planned,
            ONE_FILE,
            {"mediator_format": str(FORMAT_VERSION)},
            file_stem=Path(EXPERTS_FILE).stem,
        )

    def wants_tensor(self, job: TensorJob) -> bool:
        return job.name in self.routed

    def on_tensor(self, job: TensorJob, read_dense: Callable[[slice | None], torch.Tensor]) -> None:
        """Every expert's coded residual against D as stored, so that D + decode(r_t) is the closest
        to θ_t; the share of ‖θ_t − D‖² each keeps is summed per unit."""
        for task, source in zip(self.settings.tasks, self.expert_jobs[job.name].inputs):
            self._encode_expert(job.name, task, source, read_dense)

    def _encode_expert(
        self, name: str, task: str, source: TensorSource, read_dense: Callable[[slice | None], torch.Tensor]
    ) -> None:
        """One expert's residual, made a row chunk at a time from rows of D and of the expert read as
        needed (a code that needs the whole matrix reads it chunk by chunk, several times), written
        as its code's parts."""
        tensor, (code_name, level) = self.routed[name]
        code = get_code(code_name)
        rows, columns = matrix_shape(tensor.shape)
        chunks = [slice(0, 1)] if tensor.is_vector else row_ranges((rows, columns), chunk_elements=self.chunk_elements)
        parts = code.layout(rows, columns, tensor.dtype, level)

        def residual(chunk: slice) -> torch.Tensor:
            span = None if tensor.is_vector else chunk
            return as_matrix(source.model.read(source.name, span)).float() - as_matrix(read_dense(span)).float()

        def rows_of(stored: dict, chunk: slice) -> dict:
            return {suffix: value[chunk] if parts[suffix].per_row else value for suffix, value in stored.items()}

        writer = self.writer
        assert writer is not None  # opened by on_plan

        def write(chunk: slice, stored: dict) -> None:
            for suffix, part in stored.items():
                writer.write(f"{task}/{name}.{suffix}", part, chunk.start if parts[suffix].per_row else 0)

        sums = self.retained.setdefault((unit_of(name), task), [0.0, 0.0])

        def count(exact: torch.Tensor, stored: dict) -> None:  # the kept share, from the parts as written
            total = float(exact.double().square().sum())
            sums[0] += total - float((exact - code.decode(stored, columns)).double().square().sum())
            sums[1] += total

        if code.row_local:  # each chunk encoded, written and counted before the next is read
            for chunk in chunks:
                exact = residual(chunk)
                stored = code.encode(exact, tensor.dtype, level)
                write(chunk, stored)
                count(exact, stored)
            return
        assert code.encode_rows is not None  # a code that is not row-local encodes from row reads
        whole = code.encode_rows(residual, rows, columns, tensor.dtype, level)
        write(slice(0, rows), whole)
        for chunk in chunks:
            count(residual(chunk), rows_of(whole, chunk))

    def finalize(self, staging: Path) -> dict:
        from transformers import AutoConfig, AutoTokenizer

        assert self.writer is not None  # opened by on_plan
        self.writer.close()
        router_settings = self.settings.router
        config = load_pretrained(AutoConfig.from_pretrained, staging, trust_remote_code=False)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, staging, trust_remote_code=False, config=config)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prompt_ids = [ids for texts in self.prompts.values() for ids in encode_prompts(tokenizer, texts)]
        pooled = pooled_hidden_states(
            staging,
            prompt_ids,
            router_settings.hidden_states(config.get_text_config().num_hidden_layers),
            device=str(self.device),
            pad_id=pad or 0,
            max_tokens=router_settings.max_tokens,
            quiet=self.quiet,
        )
        features = dict(zip(self.prompts, pooled.split([len(texts) for texts in self.prompts.values()])))
        router, fit = Router.fit(features, router_settings)
        if not fit.distinguishes_tasks:
            warnings.warn(fit.warning(), RouterWarning, stacklevel=2)
        folder = staging / MEDIATOR_FOLDER
        folder.mkdir()
        shutil.move(self.building / EXPERTS_FILE, folder / EXPERTS_FILE)
        self.building.rmdir()
        save_tensors(router.state_dict(), folder / ROUTER_FILE)
        stored = sum(file.stat().st_size for file in staging.rglob("*.safetensors"))
        dense_bytes = sum(file.stat().st_size for file in staging.glob("*.safetensors"))
        manifest = self._manifest(router, fit, dense_bytes, stored)
        write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        return manifest

    def close(self) -> None:
        for model in self.experts.models if self.experts is not None else ():
            model.close()

    def _retained_share(self, unit: str, task: str) -> float:
        kept, total = self.retained.get((unit, task), (0.0, 0.0))
        return kept / total if total > 0 else 1.0

    def _manifest(self, router: Router, fit: FitReport, dense_bytes: int, stored: int) -> dict:
        settings, report, tasks = self.settings, self.report, self.settings.tasks
        choices = self.allocation.choices

        def unit_record(unit: UnitConflict) -> dict:
            record = {
                "unit": unit.unit,
                "parameters": unit.parameters,
                "sign_conflict": unit.sign_conflict,
                "cancellation": unit.cancellation,
                "routed": unit.unit in choices,
            }
            if unit.unit in choices:
                option = choices[unit.unit]
                record.update(
                    code=option[0],
                    level=option[1],
                    retained={task: round(self._retained_share(unit.unit, task), 6) for task in tasks},
                )
                if option in self.estimate.options:
                    record["estimated"] = {
                        task: round(self.estimate.share(unit.unit, index, option), 6)
                        for index, task in enumerate(tasks)
                    }
            return record

        return {
            "format": FORMAT_VERSION,
            "mergewise_version": __version__,
            "tasks": tasks,
            "merge_method": self.recipe.merge.merge_method,
            "code": settings.code,
            "routed_units": list(choices),
            "routed_tensors": {
                name: {"code": code, "level": level} for name, (_, (code, level)) in self.routed.items()
            },
            "units": [unit_record(unit) for unit in report.units],
            "memory": {
                "dense_bytes": dense_bytes,
                "stored_bytes": stored,
                "ratio": round(stored / dense_bytes, 4),
                "experts_bytes": self.allocation.stored_bytes,
                "budget": settings.memory_budget,
            },
            "prompts": {task: len(texts) for task, texts in self.prompts.items()},
            "router": router.metadata(),
            "router_fit": asdict(fit),
            "settings": settings.model_dump(mode="json"),
        }


BLOCK = BlockSpec(
    schema=MediatorSettings,
    make_stage=MediatorStage,
    rewrite_recipe=experts_as_models,
    resumable=False,
    carries_base_model=True,
    fixed_keys=("experts",),
)
