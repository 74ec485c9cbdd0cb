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


class LoraAdapter:
    """A PEFT LoRA adapter folder: per target weight, its A and B factors and the scale."""

    def __init__(self, folder: Path):
        self.folder = folder
        config_path = folder / ADAPTER_CONFIG
        config = read_json(config_path, "adapter config", folder=folder, schema=AdapterConfig)
        if config.peft_type != "LORA":
            raise MergewiseError(f"{config_path}: a {config.peft_type} adapter; only LoRA adapters apply")
        if config.rank_pattern or config.alpha_pattern:
            raise MergewiseError(f"{config_path}: per-module rank_pattern/alpha_pattern are not supported")
        self.scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.transposed = config.fan_in_fan_out
        weights = inside_folder(folder / ADAPTER_WEIGHTS, folder, "adapter weights")
        names = [info.name for info in read_safetensors_header(weights)]
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with safe_open(weights, framework="pt") as stored:
            for name in names:
                if name.endswith(".lora_A.weight"):
                    target = name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") + ".weight"
                    partner = name.removesuffix(".lora_A.weight") + ".lora_B.weight"
                    if partner not in names:
                        raise MergewiseError(f"{weights}: {name} has no {partner}")
                    self.factors[target] = _factors(
                        weights, name, stored.get_tensor(name), partner, stored.get_tensor(partner), config.r
                    )
                elif not name.endswith(".lora_B.weight"):
                    raise MergewiseError(
                        f"{weights}: tensor {name} is not a LoRA factor (modules_to_save and "
                        "trained biases are not supported)"
                    )
        if not self.factors:
            raise MergewiseError(f"{weights}: no LoRA factors")

    def check(self, model: ModelFolder) -> None:
        """Every factor pair must fit a weight of `model`: an adapter of another model fails here."""
        for target, (down, up) in self.factors.items():
            info = model.tensors.get(target)
            expected = (up.shape[0], down.shape[1]) if not self.transposed else (down.shape[1], up.shape[0])
            if info is None or tuple(info.shape) != expected or down.shape[0] != up.shape[1]:
                found = "missing" if info is None else f"of shape {list(info.shape)}"
                raise MergewiseError(
                    f"{self.folder}: LoRA factors for {target} (rank {down.shape[0]}) do not fit "
                    f"{model.path}, where it is {found}"
                )

    def apply(self, name: str, rows: torch.Tensor, span: slice | None) -> torch.Tensor:
        factors = self.factors.get(name)
        if factors is None:
            return rows
        down, up = factors
        span = span or slice(None)
        delta = (up[span] @ down) if not self.transposed else (down.T[span] @ up.T)
        return (rows.float() + self.scale * delta).to(rows.dtype)


def _factors(
    file: Path, down_name: str, down: torch.Tensor, up_name: str, up: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r × in) and B (out × r) as float32 matrices of the config's rank, holding finite values."""
    for name, factor, rank_axis in ((down_name, down, 0), (up_name, up, 1)):
        if factor.dim() != 2 or factor.shape[rank_axis] != rank:
            raise MergewiseError(
                f"{file}: {name} has shape {list(factor.shape)}; a LoRA factor of rank {rank} is a "
                f"matrix with {rank} {'rows' if rank_axis == 0 else 'columns'}"
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
        self.adapter = LoraAdapter(Path(adapter))
        self.adapter.check(self)

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
