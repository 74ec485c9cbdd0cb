"""A merge recipe with an `aim:` block: the relaxation runs per tensor inside the streaming merge.

    aim: {omega: 0.4, stats: stats.safetensors}
    aim: {omega: 0.4, calibration: {data: self, samples: 64, seq_len: 128}}   # calibrates first
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergewise.aim.relax import (
    AimSettings,
    Relaxation,
    check_fingerprint,
    record,
    relaxation_hook,
)
from mergewise.aim.statistics import (
    STATISTICS,
    CalibrationSettings,
    calibrate,
    load_statistics,
)
from mergewise.checkpoint import check_output_location
from mergewise.config import load_config, validate_block
from mergewise.engine import MergeOptions, execute_plan
from mergewise.errors import MergewiseError
from mergewise.plan import Planner


class CalibrationBlock(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    data: str = "self"
    samples: int = Field(256, ge=1)
    seq_len: int = Field(512, ge=2)
    statistic: str = Field("mean_abs", pattern="^(" + "|".join(STATISTICS) + ")$")
    seed: int = 0
    stream_layers: bool = False


class AimBlock(BaseModel):
    """The `aim:` block of a recipe: the relaxation settings and where the statistics come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    omega: float = Field(0.4, ge=0.0, le=1.0)
    exponent: float = Field(1.0, gt=0.0)
    modules: str | None = None
    allow_fingerprint_mismatch: bool = False
    stats: str | None = None
    calibration: CalibrationBlock | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AimBlock:
        if (self.stats is None) == (self.calibration is None):
            raise ValueError("give exactly one of 'stats' or 'calibration'")
        return self

    def settings(self) -> AimSettings:
        return AimSettings(self.omega, self.exponent, self.modules, self.allow_fingerprint_mismatch)


def parse_aim_block(block: dict, origin: str) -> AimBlock:
    return validate_block(AimBlock, block, origin, "aim")


def merge_with_aim(config_source, out_dir: str | Path, **options) -> Path:
    """Run the recipe's merge with the relaxation applied to every merged tensor before it is written."""
    config, config_dir = load_config(config_source)
    origin = str(config_source) if isinstance(config_source, (str, Path)) else "config"
    block = parse_aim_block(config.aim or {}, origin)
    if not config.base_model:
        raise MergewiseError(f"{origin}: aim needs base_model (the model the relaxation pulls toward)")
    merge_options = MergeOptions(**options)
    planner = Planner(config, config_dir, allow_pickle=merge_options.allow_pickle)
    base = planner.model(config.base_model, "base_model")
    plan = planner.plan()
    check_output_location(Path(out_dir).expanduser().resolve(), [model.path for model in plan.models],
                          merge_options.overwrite)
    with tempfile.TemporaryDirectory(prefix="mergewise-aim-") as scratch:
        if block.stats is not None:
            stats_path = _relative_to(Path(block.stats).expanduser(), config_dir)
        else:
            calibration = block.calibration
            settings = CalibrationSettings(calibration.data, calibration.samples, calibration.seq_len,
                                           calibration.statistic, calibration.seed)
            stats_path = calibrate(base.path, Path(scratch) / "stats.safetensors", settings,
                                   device=merge_options.device, stream_layers=calibration.stream_layers,
                                   quiet=merge_options.quiet)
        stats = load_statistics(stats_path)
        check_fingerprint(stats, base, stats_path, block.allow_fingerprint_mismatch)
        relaxation = Relaxation(stats, block.settings())
        aim_record = record(relaxation, stats_path if block.stats is not None else None)
        return execute_plan(plan, out_dir, merge_options, tensor_hook=relaxation_hook(relaxation, base),
                            extra_record={"aim": aim_record})


def _relative_to(path: Path, config_dir: Path) -> Path:
    """A relative stats path is read from the recipe's folder, else from the working folder."""
    if path.is_absolute() or not (config_dir / path).exists():
        return path
    return config_dir / path
