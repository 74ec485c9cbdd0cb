"""AIM's relaxation: pull the merged weights of the most-activated input channels back toward the base.

    W = W_b + (W_m − W_b) ⊙ (1 − (1 − ω) · I),   I = a / max(a) per module

with I broadcast along the input-channel axis (the last axis of a Linear weight, the first of GPT-2's
Conv1D, element-wise for 1-D norm weights). It works on row chunks, so it runs inside the streaming
merge (as the engine's tensor hook) or over an existing merged folder, never holding a whole model.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergewise.aim.statistics import CalibrationStats, base_fingerprint, load_statistics
from mergewise.checkpoint import (
    ModelFolder,
    check_output_location,
)
from mergewise.checkpoint.rewrite import rewrite_folder
from mergewise.errors import MergewiseError

RECORD_METADATA = ("base_fingerprint", "data", "samples", "seq_len", "statistic", "pass")


class AimSettings(BaseModel):
    """How strongly and where to relax. `exponent` sharpens (>1) or flattens (<1) the importance;
    `modules` is a regular expression searched in weight names (None: every calibrated module)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    omega: float = Field(0.4, ge=0.0, le=1.0)
    exponent: float = Field(1.0, gt=0.0)
    modules: str | None = None
    allow_fingerprint_mismatch: bool = False

    @field_validator("modules")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"invalid regular expression {pattern!r} ({error})") from None
        return pattern


class Relaxation:
    """The per-module importance vectors of a statistics file, applied to row chunks."""

    def __init__(self, stats: CalibrationStats, settings: AimSettings):
        self.stats = stats
        self.settings = settings
        self._pattern = re.compile(settings.modules) if settings.modules is not None else None
        self._importance: dict[str, torch.Tensor] = {}

    def covers(self, name: str) -> bool:
        return name in self.stats.vectors and (self._pattern is None or self._pattern.search(name) is not None)

    def importance(self, name: str) -> torch.Tensor:
        """Activations scaled to [0, 1] by their peak: per weight, or per expert for the matrix of a
        fused expert tensor (one row per expert)."""
        if name not in self._importance:
            activation = self.stats.vectors[name].float()
            peak = activation.amax(dim=-1, keepdim=True)
            measured = peak > 0
            scaled = torch.where(measured, activation / torch.where(measured, peak, 1.0), 0.0)
            self._importance[name] = scaled.pow(self.settings.exponent)
        return self._importance[name]

    def apply(self, name: str, merged: torch.Tensor, base: torch.Tensor, rows: slice) -> torch.Tensor:
        """The relaxed float32 rows `rows` of weight `name`, from its merged and base rows."""
        importance = self.importance(name).to(merged.device)
        if importance.dim() == 2:  # a fused expert tensor: rows are experts, each with its own vector
            importance = importance[rows]
            fits = merged.dim() == 3 and importance.shape == (merged.shape[0], merged.shape[-1])
            importance = importance[:, None, :]
        elif merged.dim() == 1 or self.stats.input_axis(name) == 0:
            importance = importance[rows]
            fits = importance.shape[0] == merged.shape[0]
            importance = importance.reshape(-1, *([1] * (merged.dim() - 1)))
        else:
            fits = importance.shape[0] == merged.shape[-1]
        if not fits:
            raise MergewiseError(
                f"tensor {name}: shape {list(merged.shape)} does not fit its statistics vector "
                f"({self.stats.vectors[name].numel()} channels); stats of another model?"
            )
        # W_b + Δ·(1 − (1−ω)·I), written as W_m − Δ·(1−ω)·I so that ω = 1 returns W_m bit for bit.
        merged = merged.float()
        pulled_back = (1.0 - self.settings.omega) * importance
        return merged - (merged - base.to(merged.device, torch.float32)) * pulled_back


def check_fingerprint(stats: CalibrationStats, base: ModelFolder, stats_path: str | Path, allow: bool) -> None:
    """Statistics describe one base model; with another base the relaxation would be meaningless."""
    found = base_fingerprint(base)
    if stats.metadata["base_fingerprint"] == found:
        return
    message = (
        f"{stats_path}: statistics were computed on a different base model "
        f"(fingerprint {stats.metadata['base_fingerprint']}, {base.path} has {found})"
    )
    if not allow:
        raise MergewiseError(message + "; recalibrate, or allow the mismatch explicitly")
    warnings.warn(message, stacklevel=2)


def record(relaxation: Relaxation, stats_path: str | Path | None) -> dict:
    """What mergewise.yml says about the relaxation."""
    metadata = relaxation.stats.metadata
    return {
        **relaxation.settings.model_dump(),
        "stats": str(stats_path) if stats_path else None,
        "calibration": {key: metadata[key] for key in RECORD_METADATA if key in metadata},
    }


def relax_folder(
    base_dir: str | Path,
    merged_dir: str | Path,
    stats_path: str | Path,
    out_dir: str | Path,
    settings: AimSettings = AimSettings(),
    *,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """`mergewise aim`: relax an existing merged folder into `out_dir`, tensor by tensor."""
    base, merged = ModelFolder(base_dir), ModelFolder(merged_dir)
    out_dir = Path(out_dir).expanduser().resolve()
    inputs = [base.path, merged.path, Path(stats_path).expanduser().resolve()]
    check_output_location(out_dir, inputs, overwrite)
    stats = load_statistics(stats_path)
    check_fingerprint(stats, base, stats_path, settings.allow_fingerprint_mismatch)
    relaxation = Relaxation(stats, settings)
    relaxed = [
        name
        for name, info in merged.tensors.items()
        if info.dtype.is_floating_point and relaxation.covers(name) and name in base.tensors
    ]

    def relax(name: str, rows: slice, chunk: torch.Tensor) -> torch.Tensor:
        return relaxation.apply(name, chunk, base.read(name, rows), rows) if name in relaxed else chunk

    return rewrite_folder(
        merged,
        out_dir,
        relax,
        record_key="aim",
        inputs=inputs,
        record={
            **record(relaxation, Path(stats_path).resolve()),
            "base": str(base.path),
            "merged": str(merged.path),
            "relaxed_tensors": len(relaxed),
        },
        shard_size=shard_size,
        overwrite=overwrite,
        quiet=quiet,
    )
