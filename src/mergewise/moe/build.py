"""Build a mixture-of-experts model from a mergekit-moe recipe, one tensor at a time.

plan (headers only: the output's tensors, their shapes and sources) → gates (the base model run one
decoder layer at a time over the experts' prompts) → write: the base's non-MLP tensors, each layer's
experts one expert at a time, the gates; into a staging folder moved into place when complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mergewise.checkpoint import (
    ModelFolder,
    PlannedTensor,
    StreamingShardWriter,
    check_output_location,
    copy_tokenizer,
    parse_size,
    staged_folder,
)
from mergewise.checkpoint.record import write_merge_record
from mergewise.checkpoint.writer import write_text
from mergewise.devices import parse_dtype, resolve_device
from mergewise.errors import MergewiseError
from mergewise.locator import ModelLocator
from mergewise.moe.config import Expert, MoEConfig, load_moe_config
from mergewise.moe.outputs import MLP_PROJECTIONS, OutputArchitecture, select_output

EMBEDDING = "model.embed_tokens.weight"
RANDOM_MODES = ("random", "uniform_random")
ZEROS = "zeros"  # the source of a tensor written as zeros

if TYPE_CHECKING:
    from mergewise.moe.gates import LayerGates


@dataclass(frozen=True)
class OutputTensor:
    tensor: PlannedTensor
    sources: str  # what it is made of, as --dry-run lists it


@dataclass
class MoEPlan:
    """Everything decided before any weight is read."""

    recipe_path: Path
    recipe: MoEConfig
    output: OutputArchitecture
    base: ModelFolder
    experts: list[ModelFolder]
    shared: list[ModelFolder]
    dtype: torch.dtype
    num_layers: int
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def zero_biases(self) -> list[PlannedTensor]:
        """The attention biases the output needs and the base lacks."""
        return [entry.tensor for entry in self.tensors if entry.sources == ZEROS]

    @property
    def bytes_to_write(self) -> int:
        return sum(entry.tensor.nbytes for entry in self.tensors)

    @property
    def folders(self) -> list[ModelFolder]:
        return list({id(folder): folder for folder in (self.base, *self.experts, *self.shared)}.values())


@dataclass
class MoEResult:
    plan: MoEPlan
    gates: list[LayerGates]

    @property
    def heldout_shares(self) -> list[float] | None:
        shares = [layer.heldout_share for layer in self.gates]
        return [share for share in shares if share is not None] if None not in shares else None


def plan_moe(
    recipe_path: str | Path, *, strict: bool = False, allow_pickle: bool = False, allow_all_same: bool = False
) -> MoEPlan:
    """Read the recipe and the models' configs and headers; check that the experts fit the output."""
    recipe_path = Path(recipe_path)
    recipe = load_moe_config(recipe_path, strict=strict, allow_all_same=allow_all_same)
    locator = ModelLocator(recipe_path.resolve().parent, allow_pickle=allow_pickle, strict=strict)
    base = locator.model(recipe.base_model, "base_model")
    experts = [locator.model(e.source_model, f"experts[{i}].source_model") for i, e in enumerate(recipe.experts)]
    shared = [
        locator.model(e.source_model, f"shared_experts[{i}].source_model")
        for i, e in enumerate(recipe.shared_experts or [])
    ]
    references = [recipe.base_model, *(e.source_model for e in (*recipe.experts, *(recipe.shared_experts or [])))]
    folders = [base, *experts, *shared]
    types = {reference: str(folder.config.get("model_type")) for reference, folder in zip(references, folders)}
    output = select_output(recipe, types, str(recipe_path))
    dtype = parse_dtype(recipe.dtype, f"{recipe_path}: dtype") or _declared_dtype(base) or base.stored_dtype
    num_layers = base.num_layers
    if num_layers is None:
        raise MergewiseError(f"{base.path}/config.json: no number of decoder layers (num_hidden_layers)")
    plan = MoEPlan(recipe_path, recipe, output, base, experts, shared, dtype, num_layers)
    _plan_tensors(plan)
    return plan


def _declared_dtype(folder: ModelFolder) -> torch.dtype | None:
    name = folder.config.get("dtype") or folder.config.get("torch_dtype")
    try:
        return parse_dtype(name, "") if isinstance(name, str) else None
    except MergewiseError:
        return None


def _mlp_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.{part}.weight"


def _plan_tensors(plan: MoEPlan) -> None:
    base, output, dtype = plan.base, plan.output, plan.dtype
    # layer by layer, each layer's projections by name: the first problem is the one reported
    in_order = [_mlp_name(layer, part) for layer in range(plan.num_layers) for part in sorted(MLP_PROJECTIONS)]
    mlp = set(in_order)
    if missing := [name for name in in_order if name not in base.tensors]:
        raise MergewiseError(f"{base.path}: tensor {missing[0]} is missing; its MLPs cannot become experts")
    for name in base.tensors:
        if ".mlp." in name and name not in mlp:
            raise MergewiseError(
                f"{base.path}: tensor {name}: MLP tensors other than gate/up/down weights are not supported"
            )
    for folder in (*plan.experts, *plan.shared):
        for name in in_order:
            if name not in folder.tensors:
                raise MergewiseError(f"{folder.path}: tensor {name} is missing")
            if folder.tensors[name].shape != base.tensors[name].shape:
                raise MergewiseError(
                    f"{folder.path}: tensor {name} has shape {list(folder.tensors[name].shape)}, the base "
                    f"model's is {list(base.tensors[name].shape)}"
                )
    base_name = base.name
    for name, info in base.tensors.items():
        if name not in mlp:
            plan.tensors.append(OutputTensor(PlannedTensor(name, info.shape, dtype), base_name))
    if output.zero_attention_biases:
        _plan_zero_biases(plan)
    count = len(plan.experts)
    names = ", ".join(folder.name for folder in plan.experts)
    for layer in range(plan.num_layers):
        gate_shape = base.tensors[_mlp_name(layer, "gate_proj")].shape  # [I, H]
        down_shape = base.tensors[_mlp_name(layer, "down_proj")].shape  # [H, I]
        prefix = f"model.layers.{layer}.mlp"
        if output.fused:
            plan.tensors.append(
                OutputTensor(
                    PlannedTensor(f"{prefix}.experts.gate_up_proj", (count, 2 * gate_shape[0], gate_shape[1]), dtype),
                    f"gate_proj and up_proj of {names}",
                )
            )
            plan.tensors.append(
                OutputTensor(
                    PlannedTensor(f"{prefix}.experts.down_proj", (count, *down_shape), dtype), f"down_proj of {names}"
                )
            )
        else:
            for index, folder in enumerate(plan.experts):
                for part, name in output.expert_names(layer, index).items():
                    plan.tensors.append(
                        OutputTensor(
                            PlannedTensor(name, base.tensors[_mlp_name(layer, part)].shape, dtype),
                            f"{part} of {folder.name}",
                        )
                    )
            for folder in plan.shared:
                for part in MLP_PROJECTIONS:
                    shape = base.tensors[_mlp_name(layer, part)].shape
                    name = f"{prefix}.{output.shared_module}.{part}.weight"
                    plan.tensors.append(OutputTensor(PlannedTensor(name, shape, dtype), f"{part} of {folder.name}"))
        hidden = gate_shape[1]
        mode = plan.recipe.gate_mode
        plan.tensors.append(
            OutputTensor(PlannedTensor(f"{prefix}.gate.weight", (count, hidden), dtype), f"{mode} gates")
        )
        if output.shared_gate:
            plan.tensors.append(
                OutputTensor(
                    PlannedTensor(f"{prefix}.shared_expert_gate.weight", (len(plan.shared), hidden), dtype),
                    f"{mode} gate",
                )
            )


def _plan_zero_biases(plan: MoEPlan) -> None:
    """The q/k/v biases an output with attention biases needs and the base lacks, as zeros (sized
    as mergekit-moe sizes them: hidden / heads per head)."""
    config = plan.base.config
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for layer in range(plan.num_layers):
        for part, heads in (
            ("q_proj", config["num_attention_heads"]),
            ("k_proj", config.get("num_key_value_heads") or config["num_attention_heads"]),
            ("v_proj", config.get("num_key_value_heads") or config["num_attention_heads"]),
        ):
            name = f"model.layers.{layer}.self_attn.{part}.bias"
            if name not in plan.base.tensors:
                plan.tensors.append(OutputTensor(PlannedTensor(name, (heads * head_dim,), plan.dtype), ZEROS))


# ------------------------------------------------------------------------------------ the build
def build_moe(
    plan: MoEPlan,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    seed: int = 0,
    shard_size: str | int = "5GB",
    quiet: bool = False,
) -> MoEResult:
    """Download what the plan reads, compute the gates, write the model. `seed` draws random gates
    and the experts' `noise_scale` noise, in mergekit-moe's order (its `--random-seed`)."""
    out_dir = Path(out_dir)
    check_output_location(out_dir, [path for folder in plan.folders for path in folder.folders], overwrite)
    for folder in plan.folders:
        folder.fetch_weights()
    generator = torch.Generator().manual_seed(seed)
    fixed = _random_gates(plan, generator)  # drawn before any noise, as mergekit-moe draws them
    with staged_folder(out_dir, overwrite) as staging, ThreadPoolExecutor(1, thread_name_prefix="moe-gates") as pool:
        # the gates' forward pass (and the import of transformers it needs) runs while the experts are
        # written: one is compute, the other I/O
        pending = pool.submit(compute_gates, plan, fixed, device=device, quiet=quiet)
        copy_tokenizer(plan.base.path, staging)
        writer = StreamingShardWriter(staging, [entry.tensor for entry in plan.tensors], parse_size(shard_size))
        _write_experts(plan, writer, generator, quiet)
        gates = pending.result()
        _write_gates(plan, writer, gates)
        writer.close()
        config = plan.output.make_config(_transformers_config(plan.base), plan.recipe, plan.dtype)
        write_text(staging / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        result = MoEResult(plan, gates)
        models = {folder.reference: folder.path for folder in plan.folders}
        write_merge_record(
            staging, plan.recipe.model_dump(exclude_none=True), models, seed, device, {"moe": report(result)}
        )
    return result


def _transformers_config(folder: ModelFolder):
    from transformers import AutoConfig

    from mergewise.checkpoint.pretrained import load_pretrained

    return load_pretrained(AutoConfig.from_pretrained, folder.path, trust_remote_code=False)


def report(result: MoEResult) -> dict:
    plan = result.plan
    shares = result.heldout_shares
    return {
        "architecture": plan.output.name,
        "gate_mode": plan.recipe.gate_mode,
        "experts": [folder.name for folder in plan.experts],
        "shared_experts": [folder.name for folder in plan.shared],
        # share of each expert's own prompts, held out of the gates' fit, that the gates route to it
        "heldout_own_expert_share": shares,
        "heldout_own_expert_share_mean": None if shares is None else sum(shares) / len(shares),
        "temperatures": [layer.temperature for layer in result.gates] if plan.recipe.gate_mode == "mediator" else None,
    }


def gated_experts(recipe: MoEConfig) -> list[Expert]:
    return [*recipe.experts, *recipe.gated_shared_experts]


def _random_gates(plan: MoEPlan, generator: torch.Generator) -> torch.Tensor | None:
    """A random mode's gates [layers, gated experts, H] (None for the other modes)."""
    if plan.recipe.gate_mode not in RANDOM_MODES:
        return None
    from mergewise.moe.gates import random_gates

    hidden = plan.base.tensors[_mlp_name(0, "gate_proj")].shape[1]
    return random_gates(plan.recipe.gate_mode, (plan.num_layers, len(gated_experts(plan.recipe)), hidden), generator)


def compute_gates(
    plan: MoEPlan, fixed: torch.Tensor | None, *, device: str = "cpu", quiet: bool = False
) -> list[LayerGates]:
    """Every layer's gates: `fixed` random ones, scored on the experts' prompts where they all have
    some; else fitted on them as the gate mode says."""
    from mergewise.checkpoint.pretrained import load_config_and_tokenizer
    from mergewise.moe.gates import GateFitter, GatePrompts, LayerGates, prompt_batch, run_layers

    recipe, base = plan.recipe, plan.base
    routed = len(recipe.experts)
    if fixed is not None and not all(expert.positive_prompts for expert in recipe.experts):
        return [LayerGates(fixed[layer, :routed], fixed[layer, routed:], None) for layer in range(plan.num_layers)]
    config, tokenizer = load_config_and_tokenizer(base.path)
    prompts = [
        GatePrompts(
            prompt_batch(tokenizer, expert.positive_prompts or []),
            prompt_batch(tokenizer, expert.negative_prompts) if expert.negative_prompts else None,
        )
        for expert in (recipe.experts if fixed is not None else gated_experts(recipe))  # random ones: scored only
    ]
    embedding = None
    if recipe.gate_mode == "cheap_embed":
        if EMBEDDING not in base.tensors:
            raise MergewiseError(f"{base.path}: tensor {EMBEDDING} is missing; gate_mode cheap_embed reads it")
        embedding = base.read(EMBEDDING)
    fitter = GateFitter(recipe.gate_mode, prompts, routed, embedding=embedding, fixed=fixed)
    run_layers(
        base, config, fitter.batches, fitter, dtype=base.stored_dtype, device=resolve_device(device), quiet=quiet
    )
    return fitter.layers


def _noisy(tensor: torch.Tensor, expert: Expert, part: str, generator: torch.Generator) -> torch.Tensor:
    """An expert's MLP weight with its `noise_scale` gaussian noise (drawn in the weight's dtype) and,
    for the down projection, its `residual_scale`, as mergekit-moe applies them."""
    if expert.noise_scale is not None:
        noise = torch.randn(tensor.shape, dtype=tensor.dtype, generator=generator)
        tensor = tensor + noise * expert.noise_scale
    if part == "down_proj" and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


def _write_experts(plan: MoEPlan, writer: StreamingShardWriter, generator: torch.Generator, quiet: bool) -> None:
    """Every tensor but the gates: the base's, then each layer's experts, one expert's MLP at a time.
    A weight written as it is stored is copied file to file."""
    output, recipe = plan.output, plan.recipe
    mlp_sources = {_mlp_name(layer, part) for layer in range(plan.num_layers) for part in MLP_PROJECTIONS}
    for name in tqdm([n for n in plan.base.tensors if n not in mlp_sources], desc="base tensors", disable=quiet):
        _put(plan, writer, name, 0, plan.base, name, None, generator)
    for bias in plan.zero_biases:
        writer.write(bias.name, torch.zeros(bias.shape, dtype=bias.dtype))
    shared_experts = recipe.shared_experts or []
    for layer in tqdm(range(plan.num_layers), desc="experts (layers)", disable=quiet):
        prefix = f"model.layers.{layer}.mlp"
        if output.fused:
            gate_up, down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
            gate_up_row = writer.planned(gate_up).nbytes // len(plan.experts)
            down_row = writer.planned(down).nbytes // len(plan.experts)
            for index, (folder, expert) in enumerate(zip(plan.experts, recipe.experts)):
                # expert `index` of gate_up_proj [E, 2I, H] is its gate_proj rows, then its up_proj rows
                starts = {
                    "gate_proj": (gate_up, index * gate_up_row),
                    "up_proj": (gate_up, index * gate_up_row + gate_up_row // 2),
                    "down_proj": (down, index * down_row),
                }
                for part in output.noise_order:
                    target, start = starts[part]
                    _put(plan, writer, target, start, folder, _mlp_name(layer, part), expert, generator)
        else:
            for part in output.noise_order:
                for index, (folder, expert) in enumerate(zip(plan.experts, recipe.experts)):
                    _put(
                        plan,
                        writer,
                        output.expert_names(layer, index)[part],
                        0,
                        folder,
                        _mlp_name(layer, part),
                        expert,
                        generator,
                    )
                for folder, expert in zip(plan.shared, shared_experts):
                    shared_name = f"{prefix}.{output.shared_module}.{part}.weight"
                    _put(plan, writer, shared_name, 0, folder, _mlp_name(layer, part), expert, generator)


def _put(
    plan: MoEPlan,
    writer: StreamingShardWriter,
    target: str,
    start: int,
    folder: ModelFolder,
    name: str,
    expert: Expert | None,
    generator: torch.Generator,
) -> None:
    """The tensor `name` of `folder` into `target` from byte `start` on: copied as stored where
    neither the dtype nor the expert's noise or residual scale changes it, else read and changed."""
    part = name.rsplit(".", 2)[-2]
    changed = expert is not None and (
        expert.noise_scale is not None or (part == "down_proj" and expert.residual_scale is not None)
    )
    stored = folder.stored(name)
    if stored is not None and stored.dtype == plan.dtype and not changed:
        writer.copy_stored(target, start, stored)
        return
    tensor = folder.read(name)
    if expert is not None:
        tensor = _noisy(tensor, expert, part, generator)
    writer.write_at(target, tensor.to(plan.dtype), start)


def _write_gates(plan: MoEPlan, writer: StreamingShardWriter, gates: list[LayerGates]) -> None:
    for layer, layer_gates in enumerate(gates):
        writer.write(f"model.layers.{layer}.mlp.gate.weight", layer_gates.routed.to(plan.dtype))
        if plan.output.shared_gate:
            writer.write(f"model.layers.{layer}.mlp.shared_expert_gate.weight", layer_gates.shared.to(plan.dtype))


def dry_run_lines(plan: MoEPlan) -> Iterator[str]:
    """The plan as `--dry-run` prints it: each output tensor, its shape, dtype and sources."""
    recipe = plan.recipe
    yield (
        f"output architecture: {plan.output.name}; {len(plan.experts)} experts, {plan.num_layers} layers, "
        f"{recipe.gate_mode} gates"
    )
    for entry in plan.tensors:
        tensor = entry.tensor
        yield f"  {tensor.name} {list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} <- {entry.sources}"
    read = sum(info.nbytes for folder in plan.folders for info in folder.tensors.values())
    yield f"{len(plan.tensors)} tensors, {plan.bytes_to_write / 1e6:.1f} MB to write; inputs hold {read / 1e6:.1f} MB"
