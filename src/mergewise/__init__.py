"""mergewise: merge fine-tuned LLMs, with activation-informed merging and routed experts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergewise._version import __version__
from mergewise.errors import MergewiseError

if TYPE_CHECKING:  # imported when called: `import mergewise` stays light
    from mergewise.config import MergeConfig, Recipe
    from mergewise.engine import MergeResult
    from mergewise.mediator.runtime import RoutedModel

__all__ = ["MergewiseError", "__version__", "load", "merge"]


def merge(
    recipe: str | Path | dict[str, Any] | MergeConfig | Recipe, out_dir: str | Path, **options: Any
) -> MergeResult:
    """Merge the models a recipe (a YAML path or a mapping) describes into `out_dir`, with its `aim:`
    and `mediator:` blocks; returns a `MergeResult`, a path-like (see `mergewise.engine.run_merge`)."""
    from mergewise.engine import run_merge

    return run_merge(recipe, out_dir, **options)


def load(path: str | os.PathLike[str], device: str = "cpu", **options: Any) -> RoutedModel:
    """Load a plain or Mediator model folder for generation (see `mergewise.mediator.runtime.load`)."""
    from mergewise.mediator.runtime import load as load_folder

    return load_folder(path, device, **options)
