"""The `aim:` block of a recipe: the relaxation runs on every merged row chunk inside the streaming
merge, whatever starts it (`mergewise.merge`, `mergewise merge`, a Mediator build, where it relaxes
the dense model D).

    aim: {omega: 0.4, stats: stats.safetensors}
    aim: {omega: 0.4, calibration: {data: self, samples: 64, seq_len: 128}}   # calibrates first
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from pydantic import model_validator

from mergewise.aim.relax import AimSettings, Relaxation, check_fingerprint, record
from mergewise.aim.statistics import CalibrationSettings, calibrate, load_statistics
from mergewise.checkpoint import ModelFolder
from mergewise.config import Recipe
from mergewise.errors import MergewiseError
from mergewise.methods import TensorRows
from mergewise.plan import TensorJob
from mergewise.stages import BlockSpec, Stage, StageContext


class CalibrationBlock(CalibrationSettings):
    stream_layers: bool = False


class AimBlock(AimSettings):
    """The relaxation settings and where the statistics come from: a file, or a calibration run."""

    stats: str | None = None
    calibration: CalibrationBlock | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AimBlock:
        if (self.stats is None) == (self.calibration is None):
            raise ValueError("give exactly one of 'stats' or 'calibration'")
        return self


class AimStage(Stage):
    name = "aim"

    def __init__(self, block: AimBlock, recipe: Recipe):
        if recipe.base_model is None:
            raise MergewiseError(f"{recipe.origin}: aim needs base_model (the model the relaxation pulls toward)")
        self.block = block
        self.recipe = recipe
        self.base: ModelFolder | None = None
        self.relaxation: Relaxation | None = None
        self.stats_path = (
            _relative_to(Path(block.stats).expanduser(), recipe.config_dir) if block.stats is not None else None
        )
        self._scratch: tempfile.TemporaryDirectory | None = None

    def inputs(self) -> list[Path]:
        calibration = self.block.calibration
        data = (
            Path(calibration.data).expanduser()
            if calibration is not None and calibration.data != "self" and not calibration.data.startswith("hf:")
            else None
        )
        return [path for path in (self.stats_path, data) if path is not None and path.exists()]

    def on_plan(self, context: StageContext) -> None:
        base = context.plan.base_model
        assert base is not None  # the recipe names one (checked in __init__)
        self.base = base
        if self.stats_path is not None:
            stats_path = self.stats_path
        else:
            self._scratch = tempfile.TemporaryDirectory(prefix="mergewise-aim-")
            calibration = self.block.calibration
            assert calibration is not None  # AimBlock takes stats or calibration
            settings = CalibrationSettings(**calibration.model_dump(exclude={"stream_layers"}))
            stats_path = calibrate(
                base,  # the located folder: a `base+adapter` is calibrated with its adapter
                Path(self._scratch.name) / "stats.safetensors",
                settings,
                device=str(context.device),
                stream_layers=calibration.stream_layers,
                quiet=context.quiet,
            )
        stats = load_statistics(stats_path)
        check_fingerprint(stats, base, stats_path, self.block.allow_fingerprint_mismatch)
        self.relaxation = Relaxation(stats, self.block)

    def on_rows(self, job: TensorJob, rows: TensorRows, merged: torch.Tensor) -> torch.Tensor:
        """Relax the chunk, first rounded to the output dtype so that the result equals relaxing the
        saved merge; the base rows are the ones the engine read, where the base is an input."""
        base, relaxation = self.base, self.relaxation
        assert base is not None and relaxation is not None  # set by on_plan
        base_source = job.base if job.base is not None and job.base.model is base else None
        name = base_source.name if base_source is not None else job.name
        if not relaxation.covers(name) or name not in base.tensors:
            return merged
        span = slice(rows.first_row, rows.first_row + merged.shape[0]) if merged.dim() else slice(None)
        base_rows = rows.base if base_source is not None else base.read(name, span)
        assert base_rows is not None  # the engine reads the rows of a job's base
        return relaxation.apply(name, merged.to(job.out_dtype), base_rows, span)

    def finalize(self, staging: Path) -> dict:
        assert self.relaxation is not None  # set by on_plan
        return record(self.relaxation, self.stats_path)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()


def _relative_to(path: Path, config_dir: Path) -> Path:
    """A relative stats path is read from the recipe's folder, else from the working folder."""
    if path.is_absolute() or not (config_dir / path).exists():
        return path
    return config_dir / path


BLOCK = BlockSpec(schema=AimBlock, make_stage=AimStage, fixed_keys=("calibration",))
