"""The one place a `--device` string becomes a torch device, with the same error everywhere."""

from __future__ import annotations

import torch

from mergewise.errors import MergewiseError


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
