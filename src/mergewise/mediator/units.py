"""Layer units and the expert tensors behind them.

A unit is one decoder block (every tensor with layer index N), and each other module on its own
(embeddings, final norm, lm_head): the granularity at which Mediator measures conflict and routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergewise.checkpoint import ModelFolder
from mergewise.devices import parse_dtype
from mergewise.errors import MergewiseError
from mergewise.locator import ModelLocator
from mergewise.mediator.settings import MediatorRecipe
from mergewise.plan import TensorSource, layer_index


def unit_of(tensor_name: str) -> str:
    index = layer_index(tensor_name)
    if index is not None:
        return f"layers.{index}"
    module, _, last = tensor_name.rpartition(".")
    return module if module and last in ("weight", "bias") else tensor_name


@dataclass(frozen=True)
class ExpertTensor:
    """One tensor of the base and the same-named tensor of every expert, in `experts` order."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    base: TensorSource
    inputs: list[TensorSource]


@dataclass(frozen=True)
class ExpertTensors:
    jobs: list[ExpertTensor]
    models: list[ModelFolder]


def expert_tensors(recipe: MediatorRecipe) -> ExpertTensors:
    """Every floating tensor of the base, paired with the experts' tensors by name. Presence, shapes
    and architectures are checked here, from the headers, before any data is read."""
    locator = ModelLocator(recipe.config_dir)
    base = locator.model(recipe.base_model, "base_model")
    experts = [
        locator.model(expert.model, f"mediator.experts[{index}].model")
        for index, expert in enumerate(recipe.settings.experts)
    ]
    base_type = base.config.get("model_type")
    for model in experts:
        if model.config.get("model_type") != base_type:
            raise MergewiseError(
                f"expert {model.path} is a {model.config.get('model_type')} model but the base "
                f"{base.path} is a {base_type} model; experts must be fine-tunes of the base"
            )
    dtype = parse_dtype(recipe.merge.dtype, "dtype")
    jobs = []
    for name, info in base.tensors.items():
        if not info.dtype.is_floating_point:
            continue
        for model in experts:
            found = model.tensors.get(name)
            if found is None or tuple(found.shape) != tuple(info.shape):
                problem = "missing" if found is None else f"of shape {list(found.shape)}, not {list(info.shape)}"
                raise MergewiseError(f"tensor {name} is {problem} in expert {model.path}")
        jobs.append(
            ExpertTensor(
                name,
                tuple(info.shape),
                dtype or info.dtype,
                TensorSource(base, name),
                [TensorSource(model, name) for model in experts],
            )
        )
    for model in locator.folders:  # the checks above hold: Hub weights may come now
        model.fetch_weights()
    return ExpertTensors(jobs, [base, *experts])
