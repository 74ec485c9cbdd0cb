"""The mixture-of-experts architectures `mergewise moe` writes, as mergekit-moe 0.1.5 writes them.

Each entry says which input models it takes, whether it has shared experts, its config.json, and how
its expert tensors are laid out: fused (`mlp.experts.gate_up_proj` [E, 2I, H] and
`mlp.experts.down_proj` [E, H, I], the layout transformers 5 keeps in memory) or one module per
expert (`mlp.experts.N.gate_proj.weight` ..., which transformers 5 fuses as it loads).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergewise.errors import MergewiseError
from mergewise.moe.config import MoEConfig

if TYPE_CHECKING:
    import transformers

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputArchitecture:
    name: str  # as mergekit-moe names it; a recipe's `architecture` is a prefix of it
    inputs: tuple[str, ...]  # the input models' model_type, all the same
    fused: bool  # experts.gate_up_proj / experts.down_proj rather than one module per expert
    shared_module: str | None  # the shared expert's module under `mlp.`, where the output has one
    refuses_shared: Callable[[MoEConfig], str | None]  # why the recipe's shared experts do not fit
    make_config: Callable[[transformers.PretrainedConfig, MoEConfig, torch.dtype | None], dict]
    shared_gate: bool = False  # a sigmoid gate per shared expert (`mlp.shared_expert_gate.weight`)
    zero_attention_biases: bool = False  # q/k/v biases the inputs lack are written as zeros
    # the order mergekit-moe draws the experts' noise in, per layer: expert by expert, each projection
    # in this order (fused outputs), or projection by projection, each expert in turn
    noise_order: tuple[str, ...] = MLP_PROJECTIONS

    def expert_names(self, layer: int, expert: int) -> dict[str, str]:
        """Output tensor of each MLP projection of `expert` (one module per expert)."""
        return {part: f"model.layers.{layer}.mlp.experts.{expert}.{part}.weight" for part in MLP_PROJECTIONS}


def _diff_dict(config: transformers.PretrainedConfig) -> dict:
    """config.json as `save_pretrained` writes it."""
    return json.loads(config.to_json_string(use_diff=True))


def _warn_power_of_two(count: int) -> None:
    if count & (count - 1):
        logger.warning("%d experts is not a power of two: llama.cpp cannot run the model", count)


def _mixtral_config(base: transformers.PretrainedConfig, recipe: MoEConfig, dtype: torch.dtype | None) -> dict:
    import transformers

    if not isinstance(base, transformers.MistralConfig):
        mistral = transformers.MistralConfig(**base.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = base.max_position_embeddings
        base = mistral
    config = transformers.MixtralConfig(**base.to_dict())
    config.architectures = ["MixtralForCausalLM"]
    config.num_local_experts = len(recipe.experts)
    config.num_experts_per_tok = recipe.experts_per_token
    config.sliding_window = None
    config.dtype = dtype
    _warn_power_of_two(len(recipe.experts))
    return _diff_dict(config)


def _qwen_moe_config(
    class_name: str,
    base: transformers.PretrainedConfig,
    recipe: MoEConfig,
    dtype: torch.dtype | None,
    **settings: object,
) -> dict:
    """A Qwen2-MoE or Qwen3-MoE config (`class_name`) from the base's: every layer sparse, each expert
    as wide as the base's MLP, and `settings` on top."""
    import transformers

    config = getattr(transformers, class_name)(**base.to_dict())
    config.architectures = [class_name.replace("Config", "ForCausalLM")]
    config.num_experts = len(recipe.experts)
    config.num_experts_per_tok = recipe.experts_per_token
    config.decoder_sparse_step = 1
    config.norm_topk_prob = True
    for key, value in settings.items():
        setattr(config, key, value)
    config.moe_intermediate_size = config.intermediate_size
    if dtype is not None:
        config.dtype = dtype
    _warn_power_of_two(len(recipe.experts))
    return _diff_dict(config)


def _qwen_config(base: transformers.PretrainedConfig, recipe: MoEConfig, dtype: torch.dtype | None) -> dict:
    shared_width = base.intermediate_size  # the shared expert is as wide as the routed ones
    return _qwen_moe_config(
        "Qwen2MoeConfig",
        base,
        recipe,
        dtype,
        sliding_window=None,
        use_sliding_window=False,
        shared_expert_intermediate_size=shared_width,
    )


def _qwen3_config(base: transformers.PretrainedConfig, recipe: MoEConfig, dtype: torch.dtype | None) -> dict:
    return _qwen_moe_config("Qwen3MoeConfig", base, recipe, dtype)


# DeepSeek MoE (v1) is not in transformers: its config names the model code on the Hub, which loads
# only with trust_remote_code.
DEEPSEEK_CODE = "deepseek-ai/deepseek-moe-16b-base--"


def _deepseek_config(base: transformers.PretrainedConfig, recipe: MoEConfig, dtype: torch.dtype | None) -> dict:
    shared = len(recipe.shared_experts or [])
    config = base.to_dict()
    config.update(
        architectures=["DeepseekForCausalLM"],
        model_type="deepseek",
        n_routed_experts=len(recipe.experts),
        n_shared_experts=shared or None,
        num_experts_per_tok=recipe.experts_per_token,
        first_k_dense_replace=0,
        moe_layer_freq=1,
        scoring_func="softmax",
        norm_topk_prob=True,
        moe_intermediate_size=config["intermediate_size"],
        auto_map={
            "AutoConfig": f"{DEEPSEEK_CODE}configuration_deepseek.DeepseekConfig",
            "AutoModel": f"{DEEPSEEK_CODE}modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": f"{DEEPSEEK_CODE}modeling_deepseek.DeepseekForCausalLM",
        },
    )
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def _no_shared(name: str) -> Callable[[MoEConfig], str | None]:
    return lambda recipe: f"{name} has no shared experts" if recipe.shared_experts else None


def _deepseek_shared(recipe: MoEConfig) -> str | None:
    shared = recipe.shared_experts or []
    if len(shared) > 1:
        return "DeepSeek MoE takes at most one shared expert"
    if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
        return "DeepSeek MoE does not gate its shared expert: give it no prompts"
    return None


def _qwen_shared(recipe: MoEConfig) -> str | None:
    shared = recipe.shared_experts or []
    if len(shared) != 1:
        return f"Qwen MoE takes exactly one shared expert, the recipe has {len(shared)}"
    if recipe.gate_mode not in ("random", "uniform_random") and not shared[0].positive_prompts:
        return "Qwen MoE gates its shared expert: give it positive_prompts"
    return None


OUTPUT_ARCHITECTURES: tuple[OutputArchitecture, ...] = (
    OutputArchitecture(
        "Mixtral",
        ("llama", "mistral"),
        fused=True,
        shared_module=None,
        refuses_shared=_no_shared("Mixtral"),
        make_config=_mixtral_config,
        noise_order=("gate_proj", "down_proj", "up_proj"),
    ),
    OutputArchitecture(
        "DeepSeek MoE",
        ("llama", "mistral"),
        fused=False,
        shared_module="shared_experts",
        refuses_shared=_deepseek_shared,
        make_config=_deepseek_config,
        noise_order=("up_proj", "gate_proj", "down_proj"),
    ),
    OutputArchitecture(
        "Qwen MoE",
        ("llama", "mistral", "qwen2"),
        fused=False,
        shared_module="shared_expert",
        refuses_shared=_qwen_shared,
        make_config=_qwen_config,
        shared_gate=True,
        zero_attention_biases=True,
        noise_order=("down_proj", "gate_proj", "up_proj"),
    ),
    OutputArchitecture(
        "Qwen3 MoE",
        ("qwen3",),
        fused=True,
        shared_module=None,
        refuses_shared=_no_shared("Qwen3 MoE"),
        make_config=_qwen3_config,
    ),
)


def why_not(output: OutputArchitecture, recipe: MoEConfig, model_types: dict[str, str]) -> str | None:
    """Why `output` cannot be built from the recipe whose models have `model_types` (by reference)."""
    if reason := output.refuses_shared(recipe):
        return reason
    if len(set(model_types.values())) != 1:
        listed = ", ".join(f"{reference} is {kind}" for reference, kind in model_types.items())
        return f"{output.name} needs every input model of one architecture ({listed})"
    kind = next(iter(model_types.values()))
    if kind not in output.inputs:
        return f"{output.name} takes {' or '.join(output.inputs)} models, these are {kind}"
    return None


def select_output(recipe: MoEConfig, model_types: dict[str, str], origin: str) -> OutputArchitecture:
    """The output the recipe names (a prefix of its name, as mergekit-moe matches it) that can take its
    models; without a name the first that can, Mixtral first. One error with every reason otherwise."""
    named = [
        output
        for output in OUTPUT_ARCHITECTURES
        if recipe.architecture is None or output.name.lower().startswith(recipe.architecture.lower())
    ]
    every = ", ".join(output.name for output in OUTPUT_ARCHITECTURES)
    if not named:
        raise MergewiseError(f"{origin}: architecture {recipe.architecture!r} matches no output architecture ({every})")
    reasons = {output.name: why_not(output, recipe, model_types) for output in named}
    fitting = [output for output in named if reasons[output.name] is None]
    if not fitting:
        listed = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
        raise MergewiseError(f"{origin}: no output architecture can take these models ({listed})")
    return fitting[0]
