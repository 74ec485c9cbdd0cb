"""The fused bf16 kernels must give the eager torch path's bytes: they only fuse its passes."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mergewise
from mergewise.methods import METHODS, TensorRows
from mergewise.methods.kernel_loading import bf16_kernels
from mergewise.methods.sparsify import select_magnitudes
from mergewise.methods.task_arithmetic import SparsifyStats

FUSED_METHODS = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


def bf16_family(count: int, rows: int = 300, columns: int = 97, seed: int = 0):
    """A base and `count` fine-tunes whose deltas span many magnitudes (so every rounding matters),
    with exact zeros, a NaN and an infinity among them."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, columns, generator=generator)
    inputs = []
    for _ in range(count):
        scale = torch.exp(torch.empty(rows, columns).uniform_(-12, 0, generator=generator))
        delta = torch.randn(rows, columns, generator=generator) * scale
        delta[torch.rand(rows, columns, generator=generator) < 0.05] = 0
        inputs.append((base + delta).bfloat16())
    base = base.bfloat16()
    inputs[0][3, 5] = math.nan
    inputs[-1][7, 2] = math.inf
    return base, inputs


def magnitude_selections(base, inputs, density, gamma):
    """The selections the engine's `prepare` makes, read in row chunks (for DELLA, they stand for its
    draws, which the merge reads from `prepare` the same way)."""
    return [
        select_magnitudes(zip(tensor.split(64), base.split(64)), tensor.numel(), density, gamma) for tensor in inputs
    ]


def assert_same_bits(fused: torch.Tensor, eager: torch.Tensor) -> None:
    """Equal bit patterns, except that any NaN matches any NaN (eager torch itself gives different
    NaN bits on its scalar and vector paths)."""
    assert fused.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(fused.isnan(), eager.isnan())
    numbers = ~eager.isnan()
    assert torch.equal(fused.view(torch.int16)[numbers], eager.view(torch.int16)[numbers])


@pytest.fixture(autouse=True)
def kernels_loaded():
    """The kernels load on a background thread; these tests need them in place."""
    assert bf16_kernels(wait=True) is not None


@pytest.mark.parametrize("name", FUSED_METHODS)
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("variant", ["defaults", "normalize+lambda", "negative weights+rescale factors"])
def test_fused_task_arithmetic_is_bit_identical_to_eager(name, count, variant):
    method = METHODS[name]
    base, inputs = bf16_family(count, seed=count)
    weights = [round(0.7 / (index + 1), 4) for index in range(count)]
    params = {
        "weight": weights,
        "density": [0.4] * count,
        "gamma": [0.05] * count,
        "epsilon": [0.1] * count,
        "normalize": METHODS[name].parameters["normalize"].default,
        "rescale": False,
        "lambda": 1.0,
        "int8_mask": False,
    }
    scales = [1.0] * count
    if variant == "normalize+lambda":
        params |= {"normalize": True, "lambda": 0.73}
    elif variant == "negative weights+rescale factors":
        params["weight"] = [-w if index % 2 else w for index, w in enumerate(weights)]
        scales = [1.0 + 0.37 * index for index in range(count)]
    params = {key: value for key, value in params.items() if key in method.parameters}
    gamma = 0.05 if "breadcrumbs" in name else None
    keeps = magnitude_selections(base, inputs, 0.4, gamma) if name != "task_arithmetic" else None
    stats = SparsifyStats(keeps, scales)
    for first_row, last_row in ((0, base.shape[0]), (37, 211)):  # whole tensors, and rows inside them
        rows = TensorRows(
            base[first_row:last_row], [tensor[first_row:last_row] for tensor in inputs], first_row, stats=stats
        )

        fused = method.merge(rows, params, method.fused)
        eager = method.merge(rows, params)

        assert fused is not None
        assert_same_bits(fused, eager)
        # NaN/infinity counted in the same pass (rows 3 and 7 hold them; the second range has none)
        assert rows.non_finite is (not bool(torch.isfinite(eager).all()))
        assert rows.non_finite is (first_row == 0)


def test_fused_path_declines_rows_it_does_not_cover():
    method = METHODS["ties"]
    base, inputs = bf16_family(2)
    params = {
        "weight": [0.5, 0.5],
        "density": [0.5, 0.5],
        "normalize": True,
        "rescale": False,
        "lambda": 1.0,
        "int8_mask": False,
    }
    stats = SparsifyStats(magnitude_selections(base, inputs, 0.5, None), [1.0, 1.0])
    as_float = TensorRows(base.float(), [tensor.float() for tensor in inputs], 0, stats=stats)
    assert method.merge(as_float, params, method.fused) is None
    dare = METHODS["dare_ties"]
    assert dare.merge(TensorRows(base, inputs, 0, stats=SparsifyStats(None, [1.0, 1.0])), params, dare.fused) is None


def test_merges_stay_eager_when_the_kernels_cannot_load(monkeypatch):
    from mergewise.methods import kernel_loading

    def unavailable(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(kernel_loading, "_loading", None)
    monkeypatch.setattr(kernel_loading.importlib, "import_module", unavailable)
    with pytest.warns(RuntimeWarning, match="eager"):
        assert kernel_loading.bf16_kernels(wait=True) is None
    base, inputs = bf16_family(2)
    params = {"weight": [0.5, 0.5], "normalize": False, "lambda": 1.0}
    method = METHODS["task_arithmetic"]
    assert method.merge(TensorRows(base, inputs, 0), params, method.fused) is None


@pytest.mark.integration
def test_a_process_ending_while_the_kernels_compile_waits_for_them(tmp_path):
    """Interpreter shutdown in the middle of numba's compilation aborted the process: a command that
    ends first must wait, exit cleanly and leave the compiled kernels cached."""
    cache = tmp_path / "numba-cache"
    script = "from mergewise.methods.kernel_loading import bf16_kernels; assert bf16_kernels() is None"
    environment = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert any(cache.rglob("*.nbc"))


@pytest.mark.parametrize("threshold, used", [(0, True), (10**12, False)])
def test_the_engine_tries_the_kernels_only_from_the_methods_size(threshold, used, tiny_family, tmp_path, monkeypatch):
    """Loading the kernels costs ~0.7 s, so merges smaller than `fused_min_parameters` never ask."""
    family = tiny_family("llama")
    calls = []
    method = METHODS["ties"]

    def spy(rows, **arguments):
        calls.append(rows.first_row)
        return method.fused(rows, **arguments)

    loads = []  # and their loading starts before the first tensor
    monkeypatch.setitem(
        METHODS,
        "ties",
        dataclasses.replace(
            method, fused=spy, fused_min_parameters=threshold, load_fused=lambda: loads.append("loading")
        ),
    )
    models = [{"model": str(path), "parameters": {"weight": 0.5, "density": 0.5}} for path in family.fine_tunes]
    recipe = {"merge_method": "ties", "base_model": str(family.base), "dtype": "bfloat16", "models": models}
    mergewise.merge(recipe, tmp_path / "out", quiet=True)
    assert bool(calls) is used
    assert loads == (["loading"] if used else [])


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("columns", [97, 4099])  # one block of the variance kernel, and several
def test_variance_keys_are_torch_var_of_the_bf16_task_vectors(count, columns):
    from mergewise.methods.bf16_bits import variance_keys

    base, inputs = bf16_family(count, rows=8, columns=columns)
    stacked = torch.stack(inputs)
    variances = torch.var(stacked - base, dim=0, unbiased=False).abs().reshape(-1)
    keys = np.empty(base.numel(), dtype=np.int16)
    rows = stacked.reshape(count, -1).view(torch.int16).numpy()
    nonzero = variance_keys(rows, base.reshape(-1).view(torch.int16).numpy(), keys)
    expected = np.minimum(variances.view(torch.int16).numpy(), 0x7F81)  # every NaN one key above infinity
    assert np.array_equal(-keys, expected)
    assert nonzero == int(torch.count_nonzero(variances))


def _kernel_signatures() -> dict[str, set]:
    from numba.core.dispatcher import Dispatcher

    from mergewise.methods.kernel_loading import KERNEL_MODULES

    return {
        f"{module}.{name}": set(value.signatures)
        for module in KERNEL_MODULES
        for name, value in vars(importlib.import_module(module)).items()
        if isinstance(value, Dispatcher)
    }


SELECTING_RECIPES = {
    "ties": {"weight": 0.5, "density": 0.5},
    "breadcrumbs_ties": {"weight": 0.5, "density": 0.5, "gamma": 0.01},
    "sce": {},
    "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
}


def test_after_warm_up_no_merge_compiles_a_kernel(tiny_family, tmp_path, monkeypatch):
    """`mergewise warm-up` compiles the signatures merges use, in bf16 and float32 recipes, on the
    fused path too: afterwards no merge adds one (a new one would be compiled by the first merge)."""
    from mergewise.methods.kernel_loading import warm_up_all

    list(warm_up_all())
    assert bf16_kernels(wait=True) is not None
    before = _kernel_signatures()
    family = tiny_family("llama")
    for name, parameters in SELECTING_RECIPES.items():
        monkeypatch.setitem(METHODS, name, dataclasses.replace(METHODS[name], fused_min_parameters=0))
        for dtype in ("bfloat16", "float32"):
            models = [{"model": str(path), "parameters": parameters} for path in family.fine_tunes]
            recipe = {"merge_method": name, "base_model": str(family.base), "dtype": dtype, "models": models}
            if name == "sce":
                recipe["parameters"] = {"select_topk": 0.5}
            mergewise.merge(recipe, tmp_path / f"{name}-{dtype}", quiet=True)
    assert _kernel_signatures() == before
