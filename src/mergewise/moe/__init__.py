"""`mergewise moe`: a mixture-of-experts model from dense fine-tunes (mergekit-moe's recipes)."""

from mergewise.moe.build import MoEPlan, MoEResult, build_moe, plan_moe
from mergewise.moe.config import MoEConfig, load_moe_config

__all__ = ["MoEConfig", "MoEPlan", "MoEResult", "build_moe", "load_moe_config", "plan_moe"]
