"""Which checkpoint tensors each LoRA factor pair of a PEFT adapter changes.

PEFT attaches a pair where transformers' module tree holds the weight: a linear layer's matrix
(`target_modules`), or, through `target_parameters`, a parameter of another module, such as a
router's matrix or a mixture-of-experts layer's fused 3-D expert tensor, whose factors hold one
rank-r pair per expert. The module tree is not the checkpoint: transformers renames weights and
fuses per-expert matrices between the two. So where a pair lives is asked of PEFT itself (it wraps a
meta-device skeleton of the model, which costs no memory), and the wrapped parameter is traced back
to the checkpoint through transformers' conversion rules (`CheckpointLayout`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mergewise.checkpoint.reader import ModelFolder
from mergewise.errors import MergewiseError

if TYPE_CHECKING:  # transformers loads only where an adapter needs the module tree
    from mergewise.structure import CheckpointLayout

EMBEDDING_HINTS = ("embed", "wte", "wpe", "lm_head")


@dataclass(frozen=True)
class StoredPart:
    """A checkpoint tensor and where it lies in its target's expert matrices."""

    name: str
    expert: int | None  # the expert matrix it is a block of; None: it holds every expert, stacked
    first_row: int  # its first row within that matrix, as the checkpoint orients it


@dataclass(frozen=True)
class LoraTarget:
    """A weight one factor pair adapts: `experts` matrices of shape `shape` (out, in) each, stored
    in the checkpoint as `parts`, transposed (in, out) where `transposed`."""

    parameter: str
    experts: int
    shape: tuple[int, int]
    transposed: bool
    parts: tuple[StoredPart, ...]

    @classmethod
    def stored_as(
        cls, parameter: str, experts: int, stored: Sequence[int], transposed: bool, parts: tuple[StoredPart, ...]
    ) -> LoraTarget:
        """A target from the shape its checkpoint stores (each expert's matrix the last two axes)."""
        rows, columns = int(stored[-2]) if len(stored) > 1 else 1, int(stored[-1])
        return cls(parameter, experts, (columns, rows) if transposed else (rows, columns), transposed, parts)

    @classmethod
    def one_matrix(cls, name: str, stored: Sequence[int], transposed: bool) -> LoraTarget:
        """Checkpoint tensor `name` as one matrix."""
        return cls.stored_as(name, 1, stored, transposed, (StoredPart(name, 0, 0),))

    @property
    def stored_shape(self) -> tuple[int, int]:
        """Each expert's matrix as the checkpoint orients it."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape


def expert_factors(down: torch.Tensor, up: torch.Tensor, experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each expert's (A [r, in], B [out, r]) from a pair PEFT keeps for `experts` stacked matrices:
    A holds the experts' rows one expert after another, B interleaves their columns (column j·E + e
    is expert e's j-th)."""
    rank = down.shape[0] // experts
    return [(down[e * rank : (e + 1) * rank], up[:, e::experts]) for e in range(experts)]


def pack_expert_factors(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `expert_factors`: one (A, B) pair from each expert's."""
    experts, (first_down, first_up) = len(factors), factors[0]
    rank = first_down.shape[0]
    down = torch.cat([down for down, _ in factors])
    up = torch.empty(first_up.shape[0], rank * experts, dtype=first_up.dtype)
    for expert, (_, expert_up) in enumerate(factors):
        up[:, expert::experts] = expert_up
    return down.contiguous(), up


def extraction_targets(folder: ModelFolder) -> tuple[dict[str, Any], dict[str, LoraTarget]]:
    """The adapter config fields (`target_modules`, `target_parameters`, `fan_in_fan_out`) and the
    targets, by factor key, of an adapter over every weight matrix of `folder` except embeddings and
    the output head. A folder whose architecture transformers does not know is taken by its tensor
    names: each 2-D `.weight` a linear layer of that name."""
    from mergewise.structure import CheckpointLayout, meta_model

    try:
        model = meta_model(folder)
    except MergewiseError:
        return _targets_by_name(folder)
    layout = CheckpointLayout(model, folder)
    excluded = {
        id(parameter)
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for parameter in module.parameters()
    }
    head = model.get_output_embeddings()
    if head is not None:
        excluded.add(id(head.weight))
    linear, other = [], []
    for name, parameter in model.named_parameters():
        stored = layout.sources.get(name, [])
        if (
            parameter.dim() not in (2, 3)
            or id(parameter) in excluded
            or any(hint in name for hint in EMBEDDING_HINTS)
            or not stored
            or not all(folder.tensors[part].dtype.is_floating_point for part, _ in stored)
        ):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf == "weight" and _is_linear(owner):
            linear.append(name)
        elif (parameter.dim() == 3 and min(parameter.shape[1:]) > 1) or (
            leaf == "weight" and next(owner.children(), None) is None
        ):
            other.append(name)  # fused experts; a router's matrix (other modules' own tensors are left alone)
    if not linear and not other:
        raise MergewiseError(f"{folder.path}: no weight matrices to factorise")
    fields = {"target_parameters": sorted(other) or None, "fan_in_fan_out": False}
    # Linear layers by their leaf names, as PEFT's configs usually name them; by full names where a
    # leaf name also names a layer left out (PEFT refuses it or wraps that layer too), and on models
    # with fused experts, where PEFT (0.22) reads a leaf name like `gate_proj` as a legacy per-expert
    # target and adds the fused experts at another rank.
    if not any(model.get_parameter(name).dim() == 3 for name in other):
        leaves = sorted({name.removesuffix(".weight").rpartition(".")[2] for name in linear})
        try:
            targets, left = _wrapped_targets(model, layout, {"target_modules": leaves, **fields})
        except ValueError:
            pass
        else:
            if {target.parameter for target in targets.values()} == {*linear, *other}:
                return left, targets
        model = meta_model(folder)  # unwrapped
    full = sorted(name.removesuffix(".weight") for name in linear)
    targets, left = _wrapped_targets(model, layout, {"target_modules": full, **fields})
    return left, targets


def adapter_targets(folder: ModelFolder, adapter_config: dict[str, Any]) -> dict[str, LoraTarget]:
    """The targets, by factor key, of an adapter whose adapter_config.json is `adapter_config`,
    applied to the model of `folder`."""
    from mergewise.structure import CheckpointLayout, meta_model

    model = meta_model(folder)
    names = ("r", "target_modules", "target_parameters", "fan_in_fan_out", "exclude_modules", "layers_to_transform")
    fields = {name: adapter_config[name] for name in names if adapter_config.get(name) is not None}
    if "layers_to_transform" in fields:
        fields["layers_pattern"] = adapter_config.get("layers_pattern")
    targets, _ = _wrapped_targets(model, CheckpointLayout(model, folder), fields)
    return targets


def _targets_by_name(folder: ModelFolder) -> tuple[dict[str, Any], dict[str, LoraTarget]]:
    names = [
        name
        for name, info in folder.tensors.items()
        if name.endswith(".weight")
        and len(info.shape) == 2
        and info.dtype.is_floating_point
        and not any(hint in name for hint in EMBEDDING_HINTS)
    ]
    if not names:
        raise MergewiseError(f"{folder.path}: no 2-D weight matrices to factorise")
    targets = {
        name.removesuffix(".weight"): LoraTarget.one_matrix(name, folder.tensors[name].shape, False) for name in names
    }
    modules = sorted({name.removesuffix(".weight").rpartition(".")[2] for name in names})
    return {"target_modules": modules, "target_parameters": None, "fan_in_fan_out": False}, targets


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _wrapped_targets(
    model: nn.Module, layout: CheckpointLayout, fields: dict[str, Any]
) -> tuple[dict[str, LoraTarget], dict[str, Any]]:
    """PEFT's wrappers of `model` under a LoRA config of `fields`, each as a target by its factor
    key; and `fields` as PEFT left them (it turns `fan_in_fan_out` on for GPT-2's Conv1D layers)."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    parameters = dict(model.named_parameters())
    config = LoraConfig(**{"r": 1, **fields})
    with warnings.catch_warnings():  # PEFT's notes on Conv1D and on target_parameters
        warnings.simplefilter("ignore")
        inject_adapter_in_model(config, model)
    targets = {}
    for key, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if module.r.get("default") != config.r:
            raise ValueError(f"PEFT gives {key} rank {module.r.get('default')}, not the config's {config.r}")
        owner = ".".join(part for part in key.split(".") if part != "base_layer")  # wrappers nest
        if hasattr(module, "parameter_name"):  # a ParamWrapper
            name = f"{owner}.{module.parameter_name}"
            base = module.get_base_layer()
            transposed = parameters[name].dim() == 3 and bool(getattr(base, "is_transposed", False))
        else:
            name, transposed = f"{owner}.weight", bool(getattr(module, "fan_in_fan_out", False))
        targets[key] = _target(layout, name, parameters[name], transposed)
    left = {name: getattr(config, name) for name in fields if name != "r"}
    return targets, {name: sorted(value) if isinstance(value, set) else value for name, value in left.items()}


def _target(layout: CheckpointLayout, name: str, parameter: torch.Tensor, transposed: bool) -> LoraTarget:
    """Where parameter `name` (a meta tensor) lies in the checkpoint, expert by expert."""
    experts = parameter.shape[0] if parameter.dim() == 3 else 1
    columns = parameter.shape[-1]
    parts = []
    for stored, view in layout.part_views(name, torch.empty(parameter.shape, device="meta")).items():
        if tuple(view.shape) == tuple(parameter.shape) and parameter.dim() == 3:
            parts.append(StoredPart(stored, None, 0))
            continue
        if view.dim() != 2 or view.shape[1] != columns:
            raise MergewiseError(
                f"{layout.folder.path}: tensor {stored} is not a block of rows of {name}; "
                "a LoRA adapter cannot be placed on it"
            )
        offset = view.storage_offset()
        expert_stride = parameter.stride(0) if parameter.dim() == 3 else parameter.numel()
        parts.append(StoredPart(stored, offset // expert_stride, offset % expert_stride // columns))
    return LoraTarget.stored_as(name, experts, parameter.shape, transposed, tuple(parts))


def stored_matrix(target: LoraTarget, expert: int, read: Callable[[str, slice | None], torch.Tensor]) -> torch.Tensor:
    """Expert `expert`'s matrix of `target`, (out, in), in float32, from `read(name, rows)`."""
    matrix = torch.empty(target.stored_shape)
    for part in target.parts:
        if part.expert is None:
            matrix.copy_(read(part.name, slice(expert, expert + 1))[0])
        elif part.expert == expert:
            block = read(part.name, None)
            matrix[part.first_row : part.first_row + block.shape[0]] = block
    return matrix.T if target.transposed else matrix
