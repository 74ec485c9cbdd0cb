"""The `mergewise moe` recipe: mergekit-moe's YAML, read unchanged, with its validity rules as errors.

base_model: ./base
gate_mode: hidden            # hidden | hidden_avg | hidden_last | cheap_embed | random | uniform_random | mediator
dtype: bfloat16
experts_per_token: 2
architecture: mixtral        # optional: mixtral | deepseek | qwen | qwen3 (the first that fits when left out)
experts:
  - source_model: ./math
    positive_prompts: ["Solve for x", "What is 12 * 7?"]
    negative_prompts: ["Write a poem"]
    noise_scale: 0.01        # optional: gaussian noise added to the expert's MLP weights
    residual_scale: 0.5      # optional: scales the expert's down projection
shared_experts:              # only where the output architecture has one (qwen: exactly one)
  - source_model: ./base
    positive_prompts: ["..."]
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mergewise.checkpoint.files import validated
from mergewise.errors import MergewiseError, tolerated

# mergekit-moe's gate modes, and `mediator`: gates fitted like Mediator's router (moe/gates.py)
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random", "mediator")
# modes whose gates come from prompts (the random ones need none)
PROMPTED_GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "mediator")
# a `mediator` gate's temperature and routing report come from prompts held out of the fit
MIN_MEDIATOR_PROMPTS = 2


class Expert(BaseModel):
    """A model whose MLPs become one expert of every layer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    def prompt_sets(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoEConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None

    @property
    def gated_shared_experts(self) -> list[Expert]:
        """The shared experts that get a gate vector of their own (mergekit: those with prompts, or
        all of them with random gates)."""
        shared = self.shared_experts or []
        if self.gate_mode in ("random", "uniform_random") or any(expert.positive_prompts for expert in shared):
            return list(shared)
        return []


def load_moe_config(path: str | Path, *, strict: bool = False, allow_all_same: bool = False) -> MoEConfig:
    """Read a mergekit-moe YAML file and check it; keys mergekit-moe ignores are reported (refused
    with `strict`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise MergewiseError(f"{path}: cannot read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise MergewiseError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MergewiseError(f"{path}: expected a mapping of keys (base_model, experts, ...)")
    known = set(MoEConfig.model_fields)
    for key in sorted(set(data) - known, key=str):
        tolerated(
            f"{path}: key {key!r} is not a mergekit-moe key; it is ignored, as mergekit-moe ignores it", strict=strict
        )
        del data[key]
    for index, expert in enumerate([*(data.get("experts") or []), *(data.get("shared_experts") or [])]):
        if isinstance(expert, dict):
            for key in sorted(set(expert) - set(Expert.model_fields), key=str):
                tolerated(
                    f"{path}: expert {index}: key {key!r} is not a mergekit-moe key; it is ignored", strict=strict
                )
                del expert[key]
    config = validated(MoEConfig, data, str(path))
    check_moe_config(config, str(path), allow_all_same=allow_all_same)
    return config


def check_moe_config(config: MoEConfig, origin: str, *, allow_all_same: bool = False) -> None:
    """mergekit-moe's rules for a recipe, each as one error naming what is wrong."""
    if config.gate_mode not in GATE_MODES:
        raise MergewiseError(f"{origin}: gate_mode {config.gate_mode!r}: expected one of {', '.join(GATE_MODES)}")
    if config.experts_per_token < 1:
        raise MergewiseError(f"{origin}: experts_per_token must be at least 1, got {config.experts_per_token}")
    if len(config.experts) < config.experts_per_token:
        raise MergewiseError(
            f"{origin}: {len(config.experts)} experts, fewer than experts_per_token ({config.experts_per_token})"
        )
    if len(config.experts) < 2:
        raise MergewiseError(f"{origin}: a mixture needs at least 2 experts, got {len(config.experts)}")
    if config.gate_mode in PROMPTED_GATE_MODES:
        for index, expert in enumerate(config.experts):
            if not expert.positive_prompts:
                raise MergewiseError(
                    f"{origin}: expert {index} ({expert.source_model}) has no positive_prompts; gate_mode "
                    f"{config.gate_mode} builds each expert's gate from them"
                )
        if len({expert.prompt_sets() for expert in config.experts}) == 1:
            raise MergewiseError(
                f"{origin}: every expert has the same positive and negative prompts, so their gates would be "
                "identical; give each expert prompts of what should be routed to it"
            )
    if config.gate_mode == "mediator":
        for index, expert in enumerate(config.experts):
            if len(expert.positive_prompts or ()) < MIN_MEDIATOR_PROMPTS:
                raise MergewiseError(
                    f"{origin}: expert {index} ({expert.source_model}) has "
                    f"{len(expert.positive_prompts or ())} positive prompt(s); gate_mode mediator needs at "
                    f"least {MIN_MEDIATOR_PROMPTS} per expert (some are held out to fit and score the gates)"
                )
    shared = config.shared_experts or []
    if shared and len({bool(expert.positive_prompts) for expert in shared}) > 1:
        raise MergewiseError(f"{origin}: give prompts to every shared expert or to none, not to some")
    sources = {expert.source_model for expert in config.experts}
    if len(sources) == 1 and not allow_all_same:
        raise MergewiseError(
            f"{origin}: every expert is the same model ({config.experts[0].source_model}); the mixture would "
            "cost more than it and compute the same. If you will train it afterwards, pass "
            "--i-understand-this-is-not-useful-without-training"
        )
