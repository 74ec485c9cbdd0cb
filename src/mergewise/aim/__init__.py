"""Activation-informed merging (AIM): base-model activation statistics and the relaxation that uses
them to pull a merge's most-activated input channels back toward the base. Sits on top of the core."""

from mergewise.aim.relax import AimSettings, Relaxation, relax_folder
from mergewise.aim.statistics import (
    CalibrationSettings,
    CalibrationStats,
    calibrate,
    load_statistics,
)

__all__ = [
    "AimSettings",
    "CalibrationSettings",
    "CalibrationStats",
    "Relaxation",
    "calibrate",
    "load_statistics",
    "relax_folder",
]
