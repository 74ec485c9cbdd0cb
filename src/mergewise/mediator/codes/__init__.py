"""Residual codes of Mediator's experts, by name: how θ_t − D is stored and decoded row by row.

Adding a code is one file with its layout/encode/decode and one entry in `_ALL`: its `ResidualCode`
declares its levels, and the `mediator:` block's `code`, the allocation and the build read them."""

from __future__ import annotations

from mergewise.errors import MergewiseError
from mergewise.mediator.codes.base import Part, ResidualCode, Stored, as_matrix, matrix_shape
from mergewise.mediator.codes.full import FULL
from mergewise.mediator.codes.lowrank import LOWRANK
from mergewise.mediator.codes.lowrank4 import LOWRANK4
from mergewise.mediator.codes.sign1 import SIGN1
from mergewise.mediator.codes.sign2 import SIGN2
from mergewise.mediator.codes.sparse import SPARSE

# In the order `code: auto` weighs their options (of two that keep as much for as many bytes, the first).
_ALL = (SIGN1, SIGN2, SPARSE, LOWRANK, LOWRANK4, FULL)
CODES = {code.name: code for code in _ALL}
SELECTABLE = tuple(code.name for code in _ALL if code.selectable)  # the names a recipe's `code` may give
AUTO_OPTIONS = tuple((code.name, level) for code in _ALL for level in code.auto_levels)  # what `code: auto` weighs


def get_code(name: str) -> ResidualCode:
    try:
        return CODES[name]
    except KeyError:
        raise MergewiseError(f"unknown residual code {name!r}; available: {', '.join(CODES)}") from None


__all__ = [
    "AUTO_OPTIONS",
    "CODES",
    "SELECTABLE",
    "Part",
    "ResidualCode",
    "Stored",
    "as_matrix",
    "get_code",
    "matrix_shape",
]
