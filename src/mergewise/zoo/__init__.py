"""The model zoo: real fine-tunes of one base, built offline and reproducibly (see docs/zoo.md)."""

from __future__ import annotations

import os
from pathlib import Path

from mergewise.errors import MergewiseError
from mergewise.zoo.manifest import Zoo, load_zoo
from mergewise.zoo.scales import MICRO_SCALES

SIZES = [*MICRO_SCALES, "small"]


def build_zoo(
    zoo_dir: str | os.PathLike,
    size: str,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> dict:
    """Build the zoo of `size` in `zoo_dir`, skipping models a previous run finished. It trains on as
    many threads as the caller gave torch (`mergewise zoo build`: 2, what zoo.md's budget is measured on)."""
    if size not in SIZES:
        raise MergewiseError(f"--size: expected one of {', '.join(SIZES)}, got '{size}'")
    # The builders score their models with `evaluate`, which reads zoos through this package.
    if size == "small":
        from mergewise.zoo.small import build_small_zoo

        return build_small_zoo(Path(zoo_dir), seed, data_dir)
    from mergewise.zoo.micro import build_micro_zoo

    return build_micro_zoo(Path(zoo_dir), size, seed)


__all__ = ["SIZES", "Zoo", "build_zoo", "load_zoo"]
