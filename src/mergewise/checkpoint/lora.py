"""`model: ./finetune+./adapter`: a PEFT LoRA adapter applied to a model's weights as they are read,
row chunk by row chunk (W + scale · B · A), never loading the model, as mergekit reads such paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from mergewise.checkpoint.reader import ModelFolder, inside_folder, read_safetensors_header
from mergewise.errors import MergewiseError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
PEFT_PREFIX = "base_model.model."


class LoraAdapter:
    """A PEFT LoRA adapter folder: per target weight, its A and B factors and the scale."""

    def __init__(self, folder: Path):
        self.folder = folder
        config_path = inside_folder(folder / ADAPTER_CONFIG, folder, "adapter config")
        try:
            config = json.loads(config_path.read_text())
            rank, alpha = int(config["r"]), float(config["lora_alpha"])
        except (ValueError, KeyError, TypeError) as error:
            raise MergewiseError(f"{config_path}: not a PEFT LoRA config ({error})") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise MergewiseError(f"{config_path}: a {config.get('peft_type')} adapter; only LoRA adapters apply")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise MergewiseError(f"{config_path}: per-module rank_pattern/alpha_pattern are not supported")
        self.scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        self.transposed = bool(config.get("fan_in_fan_out"))  # GPT-2's Conv1D stores weights as (in, out)
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
                    self.factors[target] = (stored.get_tensor(name).float(), stored.get_tensor(partner).float())
                elif not name.endswith(".lora_B.weight"):
                    raise MergewiseError(f"{weights}: tensor {name} is not a LoRA factor (modules_to_save and "
                                         "trained biases are not supported)")
        if not self.factors:
            raise MergewiseError(f"{weights}: no LoRA factors")

    def check(self, model: ModelFolder) -> None:
        """Every factor pair must fit a weight of `model`: an adapter of another model fails here."""
        for target, (down, up) in self.factors.items():
            info = model.tensors.get(target)
            expected = (up.shape[0], down.shape[1]) if not self.transposed else (down.shape[1], up.shape[0])
            if info is None or tuple(info.shape) != expected or down.shape[0] != up.shape[1]:
                found = "missing" if info is None else f"of shape {list(info.shape)}"
                raise MergewiseError(f"{self.folder}: LoRA factors for {target} (rank {down.shape[0]}) do not fit "
                                     f"{model.path}, where it is {found}")

    def apply(self, name: str, rows: torch.Tensor, span: slice | None) -> torch.Tensor:
        factors = self.factors.get(name)
        if factors is None:
            return rows
        down, up = factors
        span = span or slice(None)
        delta = (up[span] @ down) if not self.transposed else (down.T[span] @ up.T)
        return (rows.float() + self.scale * delta).to(rows.dtype)


class AdaptedFolder(ModelFolder):
    """A model folder read with a LoRA adapter merged into its weights."""

    def __init__(self, path: str | Path, adapter: str | Path, *, allow_pickle: bool = False):
        super().__init__(path, allow_pickle=allow_pickle)
        self.adapter = LoraAdapter(Path(adapter))
        self.adapter.check(self)

    def source_files(self) -> list[Path]:
        return [*super().source_files(), *(self.adapter.folder / name for name in ADAPTER_FILES)]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        return self.adapter.apply(name, super().read(name, rows), rows)

    def map_rows(self, name: str, rows: slice | None = None) -> torch.Tensor:
        return self.adapter.apply(name, super().map_rows(name, rows), rows)
