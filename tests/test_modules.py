"""mergekit's `modules:` recipes: each part of a multimodal model (`text_decoder`, `vision_tower`,
`multi_modal_projector`) merged from its own models with its own parameters; a text-only model is
one module, `default`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

import mergewise
from mergewise.config import load_recipe
from mergewise.errors import MergewiseError, RecipeWarning
from tests.support.tiny_models import read_state_dict

MERGEKIT_YAML = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
VISION = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."


@pytest.fixture(scope="module")
def gemma3(tiny_family):
    """A Gemma 3 family laid out as the Hub's checkpoints are, with 3 vision layers to the language
    model's 2 (so a depth gradient differs between the two modules)."""
    return tiny_family("gemma3", vision_layers=3, hub_layout=True)


def part(name: str) -> str:
    if name.startswith(VISION):
        return "vision_tower"
    return "multi_modal_projector" if name.startswith(PROJECTOR) else "text_decoder"


def merged(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(mergewise.merge(recipe, out, quiet=True, threads=1))


def test_each_module_merges_its_own_models_with_its_own_parameters(gemma3, tmp_path):
    base, (ft1, ft2, ft3) = gemma3.base, gemma3.fine_tunes
    recipe = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"weight": 0.5},
        "modules": {
            # ft2's weight is the module's 0, not the recipe's 0.5: the output is ft1's
            "text_decoder": {
                "parameters": {"weight": 0.0},
                "models": [{"model": str(ft1), "parameters": {"weight": 1}}, {"model": str(ft2)}],
            },
            "vision_tower": {"models": [{"model": str(ft1)}, {"model": str(ft3)}]},  # the recipe's 0.5 each
            "multi_modal_projector": {"models": [{"model": str(ft3)}]},
        },
    }
    out = merged(recipe, tmp_path / "out")
    inputs = {path: read_state_dict(path) for path in (base, ft1, ft3)}
    assert out.keys() == inputs[base].keys()
    assert {part(name) for name in out} == {"text_decoder", "vision_tower", "multi_modal_projector"}
    for name, tensor in out.items():
        expected = {
            "text_decoder": inputs[ft1][name],
            "vision_tower": (inputs[ft1][name] + inputs[ft3][name]) / 2,
            "multi_modal_projector": inputs[ft3][name],
        }[part(name)]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(out["language_model.model.norm.weight"], inputs[ft1]["language_model.model.norm.weight"])


def gradient_models(base: Path, ft1: Path, *_: Path) -> list[dict]:
    return [
        {"model": str(base), "parameters": {"weight": [1, 0]}},
        {"model": str(ft1), "parameters": {"weight": [0, 1]}},
    ]


def gradient_by_module(base: Path, ft1: Path, *rest: Path) -> dict:
    models = gradient_models(base, ft1)
    modules = ("text_decoder", "vision_tower", "multi_modal_projector")
    return {"merge_method": "linear", "dtype": "float32", "modules": {name: {"models": models} for name in modules}}


def gradient_over_models(base: Path, ft1: Path, *rest: Path) -> dict:
    """The same merge with models: (mergekit plans it module by module too)."""
    return {"merge_method": "linear", "dtype": "float32", "models": gradient_models(base, ft1)}


@pytest.mark.parametrize("make", [gradient_by_module, gradient_over_models])
def test_depth_gradients_run_over_each_modules_own_layers(make, gemma3, tmp_path):
    """weight [0, 1] on ft1 against the base: layer i of n gets i/(n-1) of ft1 in its own module (the
    vision tower's 3 layers, the language model's 2)."""
    out = merged(make(gemma3.base, *gemma3.fine_tunes), tmp_path / "out")
    theirs, ours = read_state_dict(gemma3.base), read_state_dict(gemma3.fine_tunes[0])
    assert out.keys() == theirs.keys()
    for layers, name in (
        (2, "language_model.model.layers.{}.mlp.up_proj.weight"),
        (3, f"{VISION}encoder.layers.{{}}.mlp.fc1.weight"),
    ):
        for layer in range(layers):
            t = layer / (layers - 1)
            expected = (1 - t) * theirs[name.format(layer)] + t * ours[name.format(layer)]
            torch.testing.assert_close(out[name.format(layer)], expected, rtol=0, atol=1e-6)


def test_a_module_left_out_is_named_and_left_out_of_the_output(gemma3, tmp_path):
    ft1, ft2 = gemma3.fine_tunes[:2]
    recipe = {
        "merge_method": "linear",
        "parameters": {"weight": 1.0},
        "modules": {"text_decoder": {"models": [{"model": str(ft1)}, {"model": str(ft2)}]}},
    }
    with pytest.warns(RecipeWarning, match="multi_modal_projector, vision_tower not named"):
        out = merged(recipe, tmp_path / "out")
    assert out and {part(name) for name in out} == {"text_decoder"}


def test_a_text_only_model_is_the_one_module_default(tiny_family, tmp_path):
    family = tiny_family("llama")
    models = [
        {"model": str(path), "parameters": {"weight": weight}} for path, weight in zip(family.fine_tunes, (0.2, 0.8))
    ]
    plain = merged({"merge_method": "linear", "models": models}, tmp_path / "plain")
    by_module = merged({"merge_method": "linear", "modules": {"default": {"models": models}}}, tmp_path / "module")
    assert plain.keys() == by_module.keys() and all(torch.equal(plain[name], by_module[name]) for name in plain)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            lambda model: {"vision": {"models": [{"model": model}]}},
            "modules.vision: .* has no module vision; its modules are multi_modal_projector, text_decoder, "
            "vision_tower",
        ),
        (
            lambda model: {"vision_tower": {"slices": [{"sources": [{"model": model, "layer_range": [0, 2]}]}]}},
            "modules.vision_tower.slices: layer slices apply to the language model only",
        ),
    ],
)
def test_a_module_the_plan_cannot_make_is_one_error_naming_it(gemma3, tmp_path, module, message):
    recipe = {"merge_method": "linear", "modules": module(str(gemma3.fine_tunes[0]))}
    with pytest.raises(MergewiseError, match=message):
        mergewise.merge(recipe, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            {"models": [{"model": "a"}], "modules": {"default": {"models": [{"model": "a"}]}}},
            "exactly one of 'models', 'slices' or 'modules'",
        ),
        ({"modules": {"default": {}}}, "modules.default: .*exactly one of 'models' or 'slices'"),
        (
            {"modules": {"default": {"models": [{"model": "a"}]}}, "aim": {"omega": 0.4, "stats": "s.safetensors"}},
            "a merge of modules: takes no aim: block yet",
        ),
    ],
)
def test_a_malformed_modules_recipe_is_one_error(recipe, message):
    with pytest.raises(MergewiseError, match=message):
        load_recipe({"merge_method": "linear", **recipe})


def ties_by_module(base: Path, ft1: Path, ft2: Path, ft3: Path) -> dict:
    """TIES with per-module models and parameters and depth gradients."""
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "float32",
        "parameters": {"density": 0.5, "weight": 0.3},
        "modules": {
            "text_decoder": {
                "parameters": {"density": 0.8},
                "models": [{"model": str(ft1), "parameters": {"weight": [0, 1]}}, {"model": str(ft2)}],
            },
            "vision_tower": {
                "models": [
                    {"model": str(ft1), "parameters": {"weight": [1, 0.2]}},
                    {"model": str(ft3), "parameters": {"density": 0.3}},
                ]
            },
            "multi_modal_projector": {"models": [{"model": str(ft2)}]},
        },
    }


def language_model_slices(base: Path, ft1: Path, ft2: Path, ft3: Path) -> dict:
    """A passthrough of 3 language-model layers (2 of ft1, then ft2's last), the rest from models."""
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "modules": {
            "text_decoder": {
                "slices": [
                    {"sources": [{"model": str(ft1), "layer_range": [0, 2]}]},
                    {"sources": [{"model": str(ft2), "layer_range": [1, 2]}]},
                ]
            },
            "vision_tower": {"models": [{"model": str(ft3)}]},
            "multi_modal_projector": {"models": [{"model": str(ft2)}]},
        },
    }


def test_language_model_slices_stack_its_layers_and_the_config_follows(gemma3, tmp_path):
    out = mergewise.merge(language_model_slices(gemma3.base, *gemma3.fine_tunes), tmp_path / "out", quiet=True)
    ft1, ft2 = (read_state_dict(path) for path in gemma3.fine_tunes[:2])
    state = read_state_dict(out)
    for layer, (source, at) in enumerate([(ft1, 0), (ft1, 1), (ft2, 1)]):
        name = "language_model.model.layers.{}.mlp.up_proj.weight"
        assert torch.equal(state[name.format(layer)], source[name.format(at)])
    text = json.loads((Path(out) / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 3
    assert text["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]  # each layer's own


@pytest.mark.integration
@pytest.mark.skipif(not MERGEKIT_YAML, reason="mergekit-yaml not found (pip install '.[peer]')")
@pytest.mark.parametrize("make", [ties_by_module, language_model_slices, gradient_over_models])
def test_modules_recipe_merges_as_mergekit_merges_it(make, gemma3, tmp_path):
    """Every tensor mergekit writes is identical; mergewise also keeps the vision tower's pooling head,
    which mergekit's Gemma 3 table leaves out, so the output loads with every weight."""
    recipe = make(gemma3.base, *gemma3.fine_tunes)
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    command = [MERGEKIT_YAML, str(tmp_path / "recipe.yml"), str(tmp_path / "mergekit")]
    result = subprocess.run([*command, "--no-cuda", "--quiet", "--no-write-model-card"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module named: nothing to warn about
        ours = merged(recipe, tmp_path / "mergewise")
    theirs = read_state_dict(tmp_path / "mergekit")
    assert theirs.keys() <= ours.keys()
    assert [name for name in theirs if not torch.equal(ours[name], theirs[name])] == []
    assert {name.removeprefix(VISION).split(".")[0] for name in ours.keys() - theirs.keys()} == {"head"}
    _, loading = AutoModelForImageTextToText.from_pretrained(tmp_path / "mergewise", output_loading_info=True)
    assert not any(loading.values()), loading
