"""The architecture matrix (tests/support/architectures.py) checked cell by cell on tiny random
checkpoints of each family, and the docs page rendered from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoTokenizer

import mergewise
from mergewise.aim import CalibrationSettings, calibrate, load_statistics
from mergewise.cli import main
from mergewise.errors import MergewiseError
from mergewise.mediator.runtime import load
from mergewise.serving.decoding import Completion, Sampling
from mergewise.structure import causal_lm_class
from tests.support.architectures import FEATURES, KINDS, WORKS, outcome, render
from tests.support.decoding import decode_all, reference_text
from tests.support.tiny_mediator import TASK_WORDS, build_exact_mediator, build_mediator_family, prompts_for
from tests.support.tiny_models import read_state_dict

ARCHS = [arch for archs in KINDS.values() for arch in archs]
DOCS_PAGE = Path(__file__).parent.parent / "docs" / "reference" / "architectures.md"
OUTSIDE_THE_LANGUAGE_MODEL = ("vision", "visual", "projector")  # where text never goes


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """make(arch): the base, three float32 fine-tunes and the tasks' prompts, built once per module."""
    built: dict[str, tuple] = {}

    def make(arch: str) -> tuple:
        if arch not in built:
            built[arch] = build_mediator_family(tmp_path_factory.mktemp(f"arch-{arch}"), arch)
        return built[arch]

    return make


def test_the_docs_page_is_the_matrix_rendered():
    assert DOCS_PAGE.read_text() == render(), "regenerate: python -m tests.support.architectures > " + str(DOCS_PAGE)


def merged_and_loaded(recipe: dict, out: Path) -> int:
    """Merge `recipe` into `out`, load it in transformers with no weight missing, unexpected or of
    another shape, generate three tokens; the merged model's depth."""
    (out.parent / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(out.parent / "recipe.yml"), str(out), "--quiet"]) == 0
    config = AutoConfig.from_pretrained(out)
    model, info = causal_lm_class(config).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("model merging combines the weights", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    return config.get_text_config().num_hidden_layers


@pytest.mark.parametrize("arch", ARCHS)
def test_merge(arch, families, tmp_path):
    assert outcome(arch, "merge") == WORKS
    _, family = families(arch)
    recipe = {
        "merge_method": "ties",
        "base_model": str(family.base),
        "dtype": "bfloat16",
        "models": [
            {"model": str(model), "parameters": {"weight": weight, "density": 0.5}}
            for model, weight in zip(family.fine_tunes, (0.6, 0.4))
        ],
    }
    assert merged_and_loaded(recipe, tmp_path / "out") == 2
    assert read_state_dict(tmp_path / "out").keys() == read_state_dict(family.base).keys()


@pytest.mark.parametrize("arch", ARCHS)
def test_slices(arch, families, tmp_path):
    _, family = families(arch)
    first, second = (str(model) for model in family.fine_tunes[:2])
    recipe = {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "slices": [
            {"sources": [{"model": first, "layer_range": [0, 2]}]},
            {"sources": [{"model": second, "layer_range": [1, 2]}]},
        ],
    }
    if outcome(arch, "slices") != WORKS:
        with pytest.raises(MergewiseError, match=outcome(arch, "slices")):
            mergewise.merge(recipe, tmp_path / "out", quiet=True)
        assert not (tmp_path / "out").exists()
        return
    assert merged_and_loaded(recipe, tmp_path / "out") == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrate(arch, families, tmp_path):
    _, family = families(arch)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(prompt for words in TASK_WORDS.values() for prompt in prompts_for(words, 6, 1)))
    settings = CalibrationSettings(data=str(text), samples=18, seq_len=16)
    in_memory = load_statistics(calibrate(family.base, tmp_path / "in-memory.safetensors", settings, quiet=True))
    if outcome(arch, "calibrate") != WORKS:
        with pytest.raises(MergewiseError, match=outcome(arch, "calibrate")):
            calibrate(family.base, tmp_path / "streamed.safetensors", settings, stream_layers=True, quiet=True)
        return
    streamed = load_statistics(
        calibrate(family.base, tmp_path / "streamed.safetensors", settings, stream_layers=True, quiet=True)
    )
    assert in_memory.vectors.keys() == streamed.vectors.keys()
    assert in_memory.vectors.keys() - {"lm_head.weight"} <= read_state_dict(family.base).keys()  # a tied head
    assert not any(part in name for name in in_memory.vectors for part in OUTSIDE_THE_LANGUAGE_MODEL)
    for name, vector in in_memory.vectors.items():
        torch.testing.assert_close(streamed.vectors[name], vector, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def exact_mediators(families, tmp_path_factory):
    """make(arch): a Mediator folder of the family with every unit routed and each expert kept whole
    (a selected route is its expert), built once per module."""
    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_exact_mediator(families(arch), tmp_path_factory.mktemp(f"mediator-{arch}") / "model")
        return built[arch]

    return make


@pytest.mark.parametrize("arch", ARCHS)
def test_mediator(arch, exact_mediators, tmp_path):
    assert outcome(arch, "mediator") == WORKS
    folder = exact_mediators(arch)
    manifest = json.loads((folder / "mediator" / "mediator.json").read_text())
    analysed = [record["unit"] for record in manifest["units"]]
    for names in (manifest["routed_tensors"], analysed):
        assert names and not any(part in name for name in names for part in OUTSIDE_THE_LANGUAGE_MODEL)
    model = load(folder)
    candidates = prompts_for(TASK_WORDS["animals"], 10, 3)
    prompt = next(
        text
        for text, route in zip(candidates, model.route_texts(candidates))
        if route.decision == "select" and route.task == "animals"
    )
    [(text, route)] = model.generate_text([prompt], max_new_tokens=6)
    assert main(["mediator", "export", str(folder), str(tmp_path / "animals"), "--task", "animals", "--quiet"]) == 0
    [(alone, plain_route)] = load(tmp_path / "animals").generate_text([prompt], max_new_tokens=6)
    assert route.task == "animals" and plain_route is None and alone == text


@pytest.mark.parametrize("arch", ARCHS)
def test_serve(arch, exact_mediators):
    assert outcome(arch, "serve") == WORKS
    model = load(exact_mediators(arch))
    prompts = prompts_for(TASK_WORDS["animals"], 3, 8)  # of different lengths: the batch is padded
    ids = model.encode(prompts)
    expected = [reference_text(model, prompt_ids, {"animals": 1.0}, 5) for prompt_ids in ids]
    stops = frozenset([model.tokenizer.eos_token_id])
    completions = [
        Completion(prompt_ids, Sampling(max_tokens=5, temperature=0), model.tokenizer, stops) for prompt_ids in ids
    ]
    decode_all(model, completions)
    assert [completion.text for completion in completions] == expected


def test_every_feature_has_a_test():
    assert {name.removeprefix("test_") for name in globals() if name.startswith("test_")} >= set(FEATURES)
