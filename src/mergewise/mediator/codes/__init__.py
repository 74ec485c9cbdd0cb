"""Residual codes of Mediator's experts, by name: how θ_t − D is stored and decoded row by row.

Adding a code is one file with its layout/encode/decode and one entry in `_ALL`."""

from __future__ import annotations

from mergewise.errors import MergewiseError
from mergewise.mediator.codes.base import Part, ResidualCode, Stored, as_matrix, matrix_shape
from mergewise.mediator.codes.full import FULL
from mergewise.mediator.codes.lowrank import LOWRANK
from mergewise.mediator.codes.lowrank4 import LOWRANK4
from mergewise.mediator.codes.sign1 import SIGN1
from mergewise.mediator.codes.sign2 import SIGN2
from mergewise.mediator.codes.sparse import SPARSE

_ALL = (SPARSE, SIGN1, SIGN2, LOWRANK, LOWRANK4, FULL)
CODES = {code.name: code for code in _ALL}


def get_code(name: str) -> ResidualCode:
    try:
        return CODES[name]
    except KeyError:
        raise MergewiseError(f"unknown residual code {name!r}; available: {', '.join(CODES)}") from None


__all__ = ["CODES", "Part", "ResidualCode", "Stored", "as_matrix", "get_code", "matrix_shape"]
