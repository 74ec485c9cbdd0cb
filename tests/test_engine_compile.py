"""The torch.compile'd kernels must give the same bytes as eager mode (they only fuse the passes)."""

from __future__ import annotations

import warnings

import pytest
import yaml

import mergewise
from mergewise import engine
from tests.support.tiny_models import read_state_dict

pytestmark = pytest.mark.integration  # torch.compile'd kernels


@pytest.mark.parametrize("method", ["nuslerp", "task_arithmetic"])
def test_compiled_merge_is_bit_identical_to_eager(tiny_family, tmp_path, method):
    family = tiny_family("llama")
    models = [{"model": str(path), "parameters": {"weight": 0.4}} for path in family.fine_tunes[:2]]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": method, "base_model": str(family.base), "dtype": "bfloat16", "models": models})
    )
    eager = mergewise.merge(recipe, tmp_path / "eager", quiet=True, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", engine.CompileFallbackWarning)  # the fused path must really run
        compiled = mergewise.merge(recipe, tmp_path / "compiled", quiet=True, compile=True, compile_min_elements=0)
    expected, got = read_state_dict(eager), read_state_dict(compiled)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].equal(tensor), name
