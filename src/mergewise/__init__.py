"""mergewise: merge fine-tuned LLMs, with activation-informed merging and routed experts."""

from importlib.metadata import PackageNotFoundError, version

from mergewise.errors import MergewiseError

try:
    __version__ = version("mergewise")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

__all__ = ["MergewiseError", "__version__", "merge"]


def merge(config_or_path, out_dir, **options):
    """Merge the models a config describes into `out_dir` (see `mergewise.engine.run_merge`)."""
    from mergewise.engine import run_merge

    return run_merge(config_or_path, out_dir, **options)
