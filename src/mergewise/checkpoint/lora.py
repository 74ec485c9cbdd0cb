"""`model: ./finetune+./adapter`: a PEFT LoRA adapter applied to a model's weights as they are read,
row chunk by row chunk (W + scale · B · A), never loading the model, as mergekit reads such paths."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open

from mergewise.adapter_targets import LoraTarget, StoredPart, expert_factors
from mergewise.checkpoint.files import inside_folder, read_json
from mergewise.checkpoint.reader import ModelFolder, PendingWeights, TensorInfo, read_safetensors_header
from mergewise.errors import MergewiseError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
PEFT_PREFIX = "base_model.model."


class AdapterConfig(BaseModel):
    """The fields of adapter_config.json that decide how a LoRA applies."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    peft_type: str = "LORA"
    r: Annotated[int, Field(strict=True, ge=1)]
    lora_alpha: Annotated[float, Field(allow_inf_nan=False)]
    use_rslora: Annotated[bool, Field(strict=True)] = False
    fan_in_fan_out: Annotated[bool, Field(strict=True)] = False  # GPT-2's Conv1D stores weights as (in, out)
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None
    # where PEFT attaches the factors in the module tree
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None


class LoraAdapter:
    """A PEFT LoRA adapter folder applied to the checkpoint tensors of `model`: per adapted tensor,
    the factors of its target and where it lies in the target's expert matrices."""

    def __init__(self, folder: Path, model: ModelFolder):
        self.folder = folder
        config_path = folder / ADAPTER_CONFIG
        config = read_json(config_path, "adapter config", folder=folder, schema=AdapterConfig)
        if config.peft_type != "LORA":
            raise MergewiseError(f"{config_path}: a {config.peft_type} adapter; only LoRA adapters apply")
        if config.rank_pattern or config.alpha_pattern:
            raise MergewiseError(f"{config_path}: per-module rank_pattern/alpha_pattern are not supported")
        self.scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        weights = inside_folder(folder / ADAPTER_WEIGHTS, folder, "adapter weights")
        names = [info.name for info in read_safetensors_header(weights)]
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with safe_open(weights, framework="pt") as stored:
            for name in names:
                if name.endswith(".lora_A.weight"):
                    partner = name.removesuffix(".lora_A.weight") + ".lora_B.weight"
                    if partner not in names:
                        raise MergewiseError(f"{weights}: {name} has no {partner}")
                    key = name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
                    pairs[key] = _factors(
                        weights, name, stored.get_tensor(name), partner, stored.get_tensor(partner), config.r
                    )
                elif not name.endswith(".lora_B.weight"):
                    raise MergewiseError(
                        f"{weights}: tensor {name} is not a LoRA factor (modules_to_save and "
                        "trained biases are not supported)"
                    )
        if not pairs:
            raise MergewiseError(f"{weights}: no LoRA factors")
        self.targets = _targets(pairs, model, config, folder)
        self.factors = pairs
        self.parts: dict[str, tuple[LoraTarget, StoredPart, list[tuple[torch.Tensor, torch.Tensor]], int]] = {}
        for key, target in self.targets.items():
            down, up = pairs[key]
            rank = config.r * target.experts
            if tuple(down.shape) != (rank, target.shape[1]) or tuple(up.shape) != (target.shape[0], rank):
                shape = [target.experts, *target.shape] if target.experts > 1 else list(target.shape)
                raise MergewiseError(
                    f"{folder}: LoRA factors for {target.parameter} (rank {config.r}) do not fit {model.path}, "
                    f"where it is of shape {shape}"
                )
            by_expert = expert_factors(down, up, target.experts)
            for part in target.parts:
                self.parts[part.name] = (target, part, by_expert, model.tensors[part.name].shape[0])

    def apply(self, name: str, rows: torch.Tensor, span: slice | None) -> torch.Tensor:
        found = self.parts.get(name)
        if found is None:
            return rows
        target, part, by_expert, stored_rows = found
        span = span or slice(None)
        if part.expert is None:  # every expert, stacked: `span` picks experts
            delta = torch.stack([self._delta(target, down, up, slice(None)) for down, up in by_expert[span]])
        else:
            start, stop, _ = span.indices(stored_rows)
            window = slice(part.first_row + start, part.first_row + stop)
            delta = self._delta(target, *by_expert[part.expert], window)
        return (rows.float() + self.scale * delta.reshape(rows.shape)).to(rows.dtype)

    @staticmethod
    def _delta(target: LoraTarget, down: torch.Tensor, up: torch.Tensor, window: slice) -> torch.Tensor:
        """Rows `window` of B·A as the checkpoint orients the target: (out, in), or (in, out)."""
        return up[window] @ down if not target.transposed else down.T[window] @ up.T


def _targets(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], model: ModelFolder, config: AdapterConfig, folder: Path
) -> dict[str, LoraTarget]:
    """Each factor key's target: the checkpoint tensor of its name where every key names one (an
    adapter of linear layers stored under the module tree's names); otherwise where PEFT attaches
    it in the model's module tree (renamed weights, fused experts, `target_parameters`)."""
    if not config.target_parameters and all(f"{key}.weight" in model.tensors for key in pairs):
        return {
            key: LoraTarget.one_matrix(f"{key}.weight", model.tensors[f"{key}.weight"].shape, config.fan_in_fan_out)
            for key in pairs
        }
    from mergewise.adapter_targets import adapter_targets

    try:
        attached = adapter_targets(model, config.model_dump())
    except ValueError as error:  # PEFT finds none of the adapter's targets in the model
        raise MergewiseError(f"{folder}: does not fit {model.path} ({str(error).splitlines()[0]})") from None
    for key in pairs:
        if key not in attached:
            raise MergewiseError(f"{folder}: LoRA factors for {key} do not fit {model.path}, where PEFT puts none")
    return {key: attached[key] for key in pairs}


def _factors(
    file: Path, down_name: str, down: torch.Tensor, up_name: str, up: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r·E × in) and B (out × r·E) as float32 matrices, holding finite values: E = 1, or the
    number of experts of a fused expert tensor."""
    for name, factor, rank_axis in ((down_name, down, 0), (up_name, up, 1)):
        if factor.dim() != 2 or factor.shape[rank_axis] % rank or not factor.shape[rank_axis]:
            raise MergewiseError(
                f"{file}: {name} has shape {list(factor.shape)}; a LoRA factor of rank {rank} is a "
                f"matrix with {rank} {'rows' if rank_axis == 0 else 'columns'} (per expert)"
            )
        if not factor.dtype.is_floating_point or not bool(torch.isfinite(factor).all()):
            raise MergewiseError(f"{file}: {name} holds NaN or infinity (or is not floating-point)")
    return down.float(), up.float()


class AdaptedFolder(ModelFolder):
    """A model folder read with a LoRA adapter merged into its weights."""

    def __init__(
        self,
        path: str | Path,
        adapter: str | Path,
        *,
        allow_pickle: bool = False,
        pending: PendingWeights | None = None,
    ):
        super().__init__(path, allow_pickle=allow_pickle, pending=pending)
        self.adapter = LoraAdapter(Path(adapter), self)

    def source_files(self) -> list[Path]:
        return [*super().source_files(), *(self.adapter.folder / name for name in ADAPTER_FILES)]

    @property
    def folders(self) -> list[Path]:
        return [*super().folders, self.adapter.folder.resolve()]

    @property
    def label(self) -> str:
        return f"{self.path} with adapter {self.adapter.folder}"

    def read(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        adapted = self.adapter.apply(name, super().read(name, rows), rows)
        return adapted if out is None else out.copy_(adapted.reshape(out.shape))

    def read_together(self, names: Sequence[str]) -> list[torch.Tensor]:
        return [self.adapter.apply(name, tensor, None) for name, tensor in zip(names, super().read_together(names))]

    def map_rows(self, name: str, rows: slice | None = None) -> torch.Tensor:
        return self.adapter.apply(name, super().map_rows(name, rows), rows)

    def stored(self, name: str) -> TensorInfo | None:
        return None  # what a read returns is the weight with the adapter merged in
