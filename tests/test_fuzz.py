"""Property-based fuzzing of what mergewise reads from strangers, through the real command entry point:
recipe YAML and safetensors headers. Whatever the input, the outcome is exit 0, or exit 2 with one
`error:` line — never a traceback, a hang or a file left behind."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergewise.cli import main
from tests.support.tiny_models import build_tiny_model

# More examples for a longer hunt: MERGEWISE_FUZZ_EXAMPLES=1000 python -m pytest tests/test_fuzz.py
FUZZ = settings(max_examples=int(os.environ.get("MERGEWISE_FUZZ_EXAMPLES", "40")), deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture],
                database=None)
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp", "nuslerp",
           "model_stock", "passthrough", "no_such_method"]
PARAMETERS = ["weight", "density", "gamma", "epsilon", "t", "lambda", "normalize", "rescale", "filter_wise", "densty"]

junk = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=8))
values = st.recursive(junk, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(["filter", "value", "x"]), inner,
                                                                      max_size=2)), max_leaves=6)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-models")
    return {name: build_tiny_model("llama", root / name, seed=seed, num_layers=2)
            for seed, name in enumerate(("base", "a", "b"))}


def run_cli(*argv: str) -> int:
    """The command, failing the test rather than hanging it past a minute."""
    def hung(signum, frame):
        raise TimeoutError(f"mergewise {' '.join(argv)} ran past its time limit")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        return main(list(argv))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(capsys, status: int, out_dir: Path) -> None:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert status in (0, 2), captured.err
    if status == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert not out_dir.exists()
    assert sorted(out_dir.parent.glob(f".{out_dir.name}.*")) == []


def recipes(models: dict[str, Path]):
    model = st.sampled_from([*(str(path) for path in models.values()), "./missing", 7])
    entry = st.fixed_dictionaries({"model": model},
                                  optional={"parameters": st.dictionaries(st.sampled_from(PARAMETERS), values,
                                                                          max_size=3),
                                            "layer_range": values})
    return st.fixed_dictionaries(
        {"merge_method": st.one_of(st.sampled_from(METHODS), junk)},
        optional={"models": st.one_of(st.lists(entry, max_size=3), junk),
                  "base_model": st.one_of(model, junk),
                  "parameters": st.one_of(st.dictionaries(st.sampled_from(PARAMETERS), values, max_size=3), junk),
                  "dtype": st.sampled_from(["bfloat16", "float32", "int8", "fp17", None]),
                  "slices": st.one_of(st.lists(st.fixed_dictionaries({"sources": st.lists(entry, max_size=2)}),
                                               max_size=2), junk),
                  "aim": values, "surprise": values})


def test_fuzzed_recipes_end_in_a_merge_or_one_error_line(models, tmp_path_factory, capsys):
    @FUZZ
    @given(recipe=recipes(models))
    def check(recipe):
        folder = tmp_path_factory.mktemp("recipe")
        config = folder / "recipe.yml"
        config.write_text(yaml.safe_dump(recipe, allow_unicode=True))
        out_dir = folder / "out"
        outcome(capsys, run_cli("merge", str(config), str(out_dir), "--quiet"), out_dir)

    check()


def test_fuzzed_yaml_text_ends_in_one_error_line(tmp_path_factory, capsys):
    @FUZZ
    @given(text=st.text(alphabet=st.sampled_from(list("{}[]:-,'\"&*!|>%@ \n\tabmodel_012")), max_size=200))
    def check(text):
        folder = tmp_path_factory.mktemp("yaml")
        (folder / "recipe.yml").write_text(text)
        outcome(capsys, run_cli("merge", str(folder / "recipe.yml"), str(folder / "out"), "--quiet"), folder / "out")

    check()


dtypes = st.sampled_from(["BF16", "F32", "F16", "I64", "U8", "F8", 3, None])
counts = st.one_of(st.integers(-3, 12), st.floats(-1, 8), st.booleans(), st.text(max_size=2))


@st.composite
def headers(draw) -> tuple[dict, int]:
    """A header of a few entries, mostly well-formed: sizes follow the shapes unless drawn otherwise."""
    entries, position = {}, 0
    for index in range(draw(st.integers(0, 3))):
        shape = draw(st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(counts, max_size=3), junk))
        dtype = draw(dtypes)
        width = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8, "U8": 1}.get(dtype, 1)
        size = width * math.prod(shape) if isinstance(shape, list) and all(type(s) is int for s in shape) else 4
        offsets = draw(st.one_of(st.just([position, position + size]), st.lists(counts, max_size=3)))
        position += size
        name = draw(st.sampled_from([f"model.layers.{index}.weight", "model.layers.0.weight", "__metadata__", ""]))
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    extra = draw(st.integers(-4, 4))
    return entries, max(0, position + extra)


def test_fuzzed_safetensors_headers_end_in_a_merge_or_one_error_line(tmp_path_factory, capsys):
    @FUZZ
    @given(header=headers(), nesting=st.integers(0, 3000))
    def check(header, nesting):
        entries, data_size = header
        folder = tmp_path_factory.mktemp("weights")
        model = folder / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
        encoded = json.dumps(entries).encode() if nesting < 2500 else ("[" * nesting + "]" * nesting).encode()
        (model / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_size))
        recipe = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}
        (folder / "recipe.yml").write_text(yaml.safe_dump(recipe))
        outcome(capsys, run_cli("merge", str(folder / "recipe.yml"), str(folder / "out"), "--quiet"), folder / "out")

    check()
