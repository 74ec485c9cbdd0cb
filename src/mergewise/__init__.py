"""mergewise: merge fine-tuned LLMs, with activation-informed merging and routed experts."""

from mergewise._version import __version__
from mergewise.errors import MergewiseError

__all__ = ["MergewiseError", "__version__", "load", "merge"]


def merge(recipe, out_dir, **options):
    """Merge the models a recipe (a YAML path or a mapping) describes into `out_dir`, with its `aim:`
    and `mediator:` blocks; returns a `MergeResult`, a path-like (see `mergewise.engine.run_merge`)."""
    from mergewise.engine import run_merge

    return run_merge(recipe, out_dir, **options)


def load(path, device: str = "cpu", **options):
    """Load a plain or Mediator model folder for generation (see `mergewise.mediator.runtime.load`)."""
    from mergewise.mediator.runtime import load as load_folder

    return load_folder(path, device, **options)
