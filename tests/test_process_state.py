"""Library code leaves the process as its caller set it: a merge, a Mediator build and a zoo build
run in-process change no thread count, random stream, thread or warnings filter (only the command
line chooses those)."""

from __future__ import annotations

import importlib.util
import random
import sys
import threading
import warnings

import numpy as np
import torch

import mergewise
from mergewise.mediator.build import build
from mergewise.methods.kernel_loading import bf16_kernels
from mergewise.zoo import build_zoo
from tests.support.tiny_mediator import build_mediator_family, mediator_recipe


def process_state() -> dict:
    numba = sys.modules.get("numba")
    return {
        "torch threads": torch.get_num_threads(),
        "numba threads": numba.get_num_threads() if numba is not None else None,
        "torch random stream": torch.random.get_rng_state().tolist(),
        "python random stream": random.getstate(),
        "numpy random stream": [np.asarray(part).tolist() for part in np.random.get_state()],
        "non-daemon threads": sorted(thread.name for thread in threading.enumerate() if not thread.daemon),
        "warnings filters": list(warnings.filters),
    }


def test_merge_mediator_build_and_zoo_build_leave_the_process_as_they_found_it(tmp_path):
    if importlib.util.find_spec("numba") is not None:
        import numba  # its thread count is part of the state checked

        numba.get_num_threads()  # starts numba's threading layer, which resets OpenMP's thread count
    root, family = build_mediator_family(tmp_path / "family")
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # a caller's own filter, which must survive
        torch.set_num_threads(1)  # a caller's own count, unlike what a command line would choose
        torch.manual_seed(1234)
        random.seed(5)
        np.random.seed(6)
        try:
            before = process_state()
            recipe = {
                "merge_method": "dare_ties",
                "base_model": str(family.base),
                "dtype": "bfloat16",
                "models": [
                    {"model": str(path), "parameters": {"weight": 0.5, "density": 0.5}} for path in family.fine_tunes
                ],
            }
            mergewise.merge(recipe, tmp_path / "merged", quiet=True, seed=0)
            bf16_kernels(wait=True)  # the fused kernels load and launch
            build(mediator_recipe(root, family), tmp_path / "mediator", quiet=True, seed=0)
            build_zoo(tmp_path / "zoo", "tiny", seed=0)
            after = process_state()
        finally:
            torch.set_num_threads(threads)
    assert after == before
