"""The model zoo: real fine-tunes of one base, built offline and reproducibly (see docs/zoo.md)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mergewise.errors import MergewiseError
from mergewise.zoo.manifest import Zoo, load_zoo
from mergewise.zoo.micro import MICRO_SCALES, build_micro_zoo
from mergewise.zoo.small import build_small_zoo

SIZES = [*MICRO_SCALES, "small"]
DEFAULT_THREADS = 2  # the build times docs/zoo.md gives are measured on 2 CPU cores


def build_zoo(
    zoo_dir: str | os.PathLike,
    size: str,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    threads: int = DEFAULT_THREADS,
) -> dict:
    """Build the zoo of `size` in `zoo_dir`, skipping models a previous run finished."""
    if size not in SIZES:
        raise MergewiseError(f"--size: expected one of {', '.join(SIZES)}, got '{size}'")
    if threads < 1:
        raise MergewiseError(f"--threads: must be at least 1, got {threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if size == "small":
            return build_small_zoo(Path(zoo_dir), seed, data_dir)
        return build_micro_zoo(Path(zoo_dir), size, seed)
    finally:
        torch.set_num_threads(previous_threads)


__all__ = ["SIZES", "Zoo", "build_zoo", "load_zoo"]
