"""Which checkpoint tensors make each parameter of a transformers model.

transformers 5 renames and fuses weights between a checkpoint and the module tree: a Mixtral
checkpoint's `block_sparse_moe.experts.3.w1.weight` (one matrix per expert) becomes part of the
module's `mlp.experts.gate_up_proj` (one 3-D tensor for all experts). The passes that load a model a
layer at a time read the checkpoint themselves, so they follow transformers' own conversion rules
(`get_model_conversion_mapping`) rather than restating them per architecture: a new architecture's
rules come with transformers.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
)

from mergewise.checkpoint import ModelFolder
from mergewise.checkpoint.pretrained import load_pretrained
from mergewise.errors import MergewiseError


class CheckpointLayout:
    """The checkpoint tensors behind each parameter of `model` (a meta-device skeleton of the
    folder's architecture), and how they combine into it."""

    def __init__(self, model: PreTrainedModel, folder: ModelFolder):
        from transformers import core_model_loading as loading
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model = model
        self.folder = folder
        rules = get_model_conversion_mapping(model)
        renamings = [rule for rule in rules if isinstance(rule, loading.WeightRenaming)]
        converters = [rule for rule in rules if isinstance(rule, loading.WeightConverter)]
        parameters = model.state_dict()
        self.sources: dict[str, list[tuple[str, str | None]]] = defaultdict(list)  # (stored name, rule's pattern)
        self._converters: dict[str, Any] = {}
        self._parameter_of: dict[str, str] = {}
        for stored in sorted(folder.tensors, key=loading.dot_natural_key):  # experts in numeric order
            target, pattern = loading.rename_source_key(
                stored, renamings, converters, model.base_model_prefix, parameters
            )
            self.sources[target].append((stored, pattern))
            self._parameter_of[stored] = target
            if pattern is not None:
                self._converters[target] = next(rule for rule in converters if pattern in rule.source_patterns)

    def stored_names(self, name: str) -> list[str]:
        """The checkpoint tensors parameter `name` is made of."""
        entries = self.sources.get(name)
        if not entries:
            import transformers

            raise MergewiseError(
                f"{self.folder.path}: tensor {name} is missing from the checkpoint (where transformers "
                f"{transformers.__version__} looks for a {self.model.config.model_type} model's weights)"
            )
        return [stored for stored, _ in entries]

    def stored_name(self, name: str) -> str | None:
        """The one checkpoint tensor parameter `name` is stored as (under its own name or renamed);
        None where transformers assembles it from several, or the checkpoint lacks it."""
        entries = self.sources.get(name, [])
        return entries[0][0] if len(entries) == 1 and name not in self._converters else None

    def expert_parts(self, name: str) -> list[list[str]]:
        """The checkpoint tensors of each expert of fused expert parameter `name`: transformers stacks
        the tensors of each source pattern in order, the k-th being expert k's (w1 and w3 of expert k
        both go into `gate_up_proj`)."""
        by_pattern: dict[str | None, list[str]] = defaultdict(list)
        for stored, pattern in self.sources.get(name, []):
            by_pattern[pattern].append(stored)
        return [list(parts) for parts in zip(*by_pattern.values())]

    def parameter_of(self, stored: str) -> str:
        """The parameter checkpoint tensor `stored` goes into (under its own name or another)."""
        return self._parameter_of[stored]

    def part_views(self, name: str, parameter: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `parameter` (parameter `name` as the model holds it) at each of its checkpoint
        tensors, in their stored shape: where one expert's matrix lies in a fused tensor, so that it can
        be overwritten in place. Follows the operations of transformers' rule for it: stacking the
        experts (`MergeModulelist`) and joining the projections (`Concatenate`); any other operation,
        or a part that is not one contiguous block, is one error."""
        from transformers import core_model_loading as loading

        converter = self._converters.get(name)
        if converter is None:
            return {self.stored_names(name)[0]: parameter}
        stacked, joined = None, None
        for operation in converter.operations:
            if isinstance(operation, loading.MergeModulelist) and stacked is None:
                stacked = operation.dim
            elif isinstance(operation, loading.Concatenate) and joined is None:
                joined = operation.dim
            else:
                raise MergewiseError(
                    f"{self.folder.path}: {name} is assembled by {type(operation).__name__}, which cannot be "
                    "routed in place"
                )
        by_pattern: dict[str, list[str]] = {pattern: [] for pattern in converter.source_patterns}
        for stored, pattern in self.sources[name]:
            by_pattern[str(pattern)].append(stored)  # a converter's sources all carry their pattern
        views, offset = {}, 0
        for parts in by_pattern.values():
            stacked_shape = list(self.folder.tensors[parts[0]].shape)  # the parts of this pattern, stacked
            if stacked is not None:
                stacked_shape.insert(stacked, len(parts))
            block = parameter
            if joined is not None:
                block = parameter.narrow(joined, offset, stacked_shape[joined])
                offset += stacked_shape[joined]
            for index, stored in enumerate(parts):
                view = block.select(stacked, index) if stacked is not None else block
                if tuple(view.shape) != tuple(self.folder.tensors[stored].shape) or not view.is_contiguous():
                    raise MergewiseError(
                        f"{self.folder.path}: tensor {stored} is not one contiguous block of {name}; it cannot be "
                        "routed in place"
                    )
                views[stored] = view
        return views

    def assemble(self, name: str, stored: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parameter `name` from its checkpoint tensors (as `stored_names` lists them): the tensor
        itself, or what transformers' conversion makes of them (experts stacked, projections joined)."""
        if name not in self._converters:
            return stored[0]
        converter = copy.deepcopy(self._converters[name])
        for (stored_name, pattern), tensor in zip(self.sources[name], stored):
            converter.add_tensor(name, stored_name, pattern, _ready(tensor))
        return converter.convert(name, model=self.model, config=self.model.config)[name]

    def read(
        self, names: Sequence[str], read_together: Callable[[list[str]], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Parameters `names`, their checkpoint tensors read in one `read_together` call."""
        wanted = [self.stored_names(name) for name in names]
        tensors = iter(read_together([stored for group in wanted for stored in group]))
        return [self.assemble(name, [next(tensors) for _ in group]) for name, group in zip(names, wanted)]


def _ready(tensor: torch.Tensor) -> Future:
    """A finished future holding `tensor`: how transformers' converters take their inputs."""
    future: Future = Future()
    future.set_result(tensor)
    return future


def causal_lm_class(config: PretrainedConfig) -> type[AutoModelForCausalLM] | type[AutoModelForImageTextToText]:
    """The auto class that builds a model of `config` with its language-model head: causal LMs, and
    the multimodal models transformers builds only as image-text-to-text ones (LLaVA, Qwen2-VL)."""
    if config.get_text_config() is not config and type(config) not in AutoModelForCausalLM._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def language_model_tensors(folder: ModelFolder) -> set[str]:
    """The checkpoint tensors of the language model and its head: all of a causal LM's; of a
    multimodal model's, those text runs through (not its vision tower nor its projector)."""
    modules = model_modules(folder)
    return modules.get("text_decoder") or set(folder.tensors)


def meta_model(folder: ModelFolder) -> PreTrainedModel:
    """The folder's model with its language-model head, built from its config on the meta device
    (no memory, no weights read); one error where transformers does not know the architecture."""
    try:
        config = load_pretrained(AutoConfig.from_pretrained, folder.path, trust_remote_code=False)
        with torch.device("meta"):
            return causal_lm_class(config).from_config(config)
    except (OSError, ValueError, KeyError) as error:
        raise MergewiseError(
            f"{folder.path}: transformers cannot build its model ({str(error).splitlines()[0]})"
        ) from None


# mergekit's names for a multimodal model's parts, where transformers' attribute names differ.
_MODULE_NAMES = {"language_model": "text_decoder", "visual": "vision_tower"}


def model_modules(folder: ModelFolder) -> dict[str, set[str]]:
    """The checkpoint tensors of each of the model's modules, named as mergekit's `modules:` recipes
    name them: a text-only model is one module, `default`; of a multimodal model, the language model
    with its head is `text_decoder`, the projector `multi_modal_projector`, and each other part of the
    base model keeps its transformers name (`vision_tower`, `vision_model`; Qwen2-VL's `visual` is
    `vision_tower`). Every checkpoint tensor is in one module."""
    if folder.declared.text_config is None:
        return {"default": set(folder.tensors)}
    model = meta_model(folder)
    names = {id(module): name for name, module in model.named_modules()}
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    prefixes = {f"{names[id(owner)]}.": "text_decoder" for owner in (decoder, head) if owner is not None}
    base_prefix = f"{names[id(model.base_model)]}." if model.base_model is not model else ""
    for child_name, child in model.base_model.named_children() if model.base_model is not decoder else ():
        if child is not decoder:
            module = "multi_modal_projector" if "projector" in child_name else _MODULE_NAMES.get(child_name, child_name)
            prefixes[f"{base_prefix}{child_name}."] = module
    modules: dict[str, set[str]] = defaultdict(set)
    for parameter, entries in CheckpointLayout(model, folder).sources.items():
        owner = max((prefix for prefix in prefixes if parameter.startswith(prefix)), key=len, default=None)
        # a parameter of the base model itself (LLaVA-NeXT's image_newline) is a module of its own
        module = prefixes[owner] if owner is not None else parameter.removeprefix(base_prefix).split(".")[0]
        modules[module].update(stored for stored, _ in entries)
    return dict(modules)
