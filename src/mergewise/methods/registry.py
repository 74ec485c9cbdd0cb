"""Merge methods by name. Adding a method is one function plus one entry in `_ALL`."""

from __future__ import annotations

from mergewise.errors import MergewiseError
from mergewise.methods.arcee_fusion import ARCEE_FUSION
from mergewise.methods.base import MergeMethod
from mergewise.methods.linear import LINEAR
from mergewise.methods.model_stock import MODEL_STOCK
from mergewise.methods.nearswap import NEARSWAP
from mergewise.methods.passthrough import PASSTHROUGH
from mergewise.methods.ram import RAM, RAMPLUS_TL
from mergewise.methods.sce import SCE
from mergewise.methods.slerp import NUSLERP, SLERP
from mergewise.methods.spherical_mean import KARCHER, MULTISLERP
from mergewise.methods.task_arithmetic import TASK_ARITHMETIC_METHODS


def _build_registry(methods: tuple[MergeMethod, ...]) -> dict[str, MergeMethod]:
    registry: dict[str, MergeMethod] = {}
    for method in methods:
        if method.name in registry:
            raise ValueError(f"merge method {method.name!r} registered twice")
        registry[method.name] = method
    return registry


_ALL = (
    LINEAR,
    *TASK_ARITHMETIC_METHODS,
    SLERP,
    NUSLERP,
    MODEL_STOCK,
    PASSTHROUGH,
    SCE,
    NEARSWAP,
    ARCEE_FUSION,
    MULTISLERP,
    KARCHER,
    RAM,
    RAMPLUS_TL,
)
METHODS = _build_registry(_ALL)


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise MergewiseError(f"unknown merge_method {name!r}; available: {', '.join(sorted(METHODS))}") from None
