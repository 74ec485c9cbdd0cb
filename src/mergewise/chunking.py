"""Row chunks: the unit in which every tensor is read, merged, coded and written, so that memory
depends on the widest tensor and never on the model's depth."""

from __future__ import annotations

import math

# ~4 MB of float32 per input per chunk: an eager method's temporaries stay in the CPU's caches
# between its passes (with 4 M-element chunks eager task arithmetic on a 0.2 B-parameter model took
# 1.0-1.5 s instead of 0.85-1.0 s on 2 cores).
CHUNK_ELEMENTS = 1 << 20


def row_ranges(shape: tuple[int, ...], *, whole: bool = False, chunk_elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Row chunks of about `chunk_elements` elements (one chunk for scalars, or when `whole`)."""
    if not shape:
        return [slice(None)]
    row_elements = math.prod(shape[1:])
    step = max(shape[0], 1) if whole or row_elements == 0 else max(1, chunk_elements // row_elements)
    return [slice(start, min(start + step, shape[0])) for start in range(0, max(shape[0], 1), step)]
