"""Layer units and the expert tensors behind them.

A unit is one decoder block (every tensor with layer index N), and each other module on its own
(embeddings, final norm, lm_head): the granularity at which Mediator measures conflict and routes.
"""

from __future__ import annotations

from mergewise.config import MergeConfig
from mergewise.errors import MergewiseError
from mergewise.mediator.settings import MediatorRecipe
from mergewise.plan import MergePlan, Planner, layer_index


def unit_of(tensor_name: str) -> str:
    index = layer_index(tensor_name)
    if index is not None:
        return f"layers.{index}"
    module, _, last = tensor_name.rpartition(".")
    return module if module and last in ("weight", "bias") else tensor_name


def expert_plan(recipe: MediatorRecipe) -> MergePlan:
    """A plan whose jobs pair every base tensor with the experts' tensors, in `experts` order.

    It checks presence and shapes (an expert of another architecture fails here, naming the tensor)
    without reading any data."""
    config = MergeConfig(merge_method="task_arithmetic", base_model=recipe.base_model,
                         models=[{"model": expert.model, "parameters": {"weight": 1.0}}
                                 for expert in recipe.settings.experts],
                         dtype=recipe.merge.dtype)
    planner = Planner(config, recipe.config_dir)
    base = planner.model(recipe.base_model, "base_model")
    base_type = base.config.get("model_type")
    for index, expert in enumerate(recipe.settings.experts):
        model = planner.model(expert.model, f"mediator.experts[{index}].model")
        if model.config.get("model_type") != base_type:
            raise MergewiseError(f"expert {model.path} is a {model.config.get('model_type')} model but the base "
                                 f"{base.path} is a {base_type} model; experts must be fine-tunes of the base")
    return planner.plan()
