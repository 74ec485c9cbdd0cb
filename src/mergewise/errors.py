"""The one exception type users see: the CLI prints it as a single `error: …` line (exit 2); and the
one warning type for what a recipe holds that mergekit accepts without using it."""

from __future__ import annotations

import warnings


class MergewiseError(Exception):
    """Bad input or a refused operation; the message names the file, tensor or key at fault."""


class RecipeWarning(UserWarning):
    """A recipe key or value that mergekit 0.1.5 accepts and ignores (or reads in its own way):
    mergewise merges the recipe as mergekit does, and names what it leaves aside."""


def tolerated(message: str, *, strict: bool) -> None:
    """Report something mergekit lets pass: a RecipeWarning, or with `strict` an error."""
    if strict:
        raise MergewiseError(f"{message} (refused: --strict)")
    warnings.warn(message, RecipeWarning, stacklevel=2)
