"""The one place a `--device` string becomes a torch device, and a dtype name (a recipe's `dtype`,
a `--dtype`) a torch dtype, with the same errors everywhere."""

from __future__ import annotations

import torch

from mergewise.errors import MergewiseError

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "float64": torch.float64,
}


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' → torch.device; CUDA asked for on a machine without it is an error."""
    if name != "cpu" and name != "cuda" and not name.startswith("cuda:"):
        raise MergewiseError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergewiseError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MergewiseError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None


def parse_dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise MergewiseError(f"{key}: unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPES))}") from None
