"""Mediator beyond dense causal LMs. On mixture-of-experts models the checkpoint stores one matrix per
MoE expert and transformers holds all of a layer's experts in one fused tensor: the runtime routes
each stored matrix in place, inside the fused tensor. On multimodal models text runs through the
language model alone: only its tensors are routed; the vision tower and projector are merged."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergewise.cli import main
from mergewise.mediator.build import build
from mergewise.mediator.runtime import load
from tests.support.tiny_mediator import TASK_WORDS, build_mediator_family, mediator_recipe, prompts_for
from tests.support.tiny_models import VISION_LANGUAGE_ARCHITECTURES


def exact_mediator(family: tuple, out: Path) -> Path:
    """Every unit routed, each expert kept whole (sparse at density 1): a selected route is its expert."""
    root, built = family
    build(mediator_recipe(root, built, route_threshold=0.0, code="sparse", density=1.0), out, quiet=True, seed=0)
    return out


@pytest.fixture(scope="module")
def moe_family(tmp_path_factory):
    return build_mediator_family(tmp_path_factory.mktemp("moe-family"), "qwen3_moe")


@pytest.fixture(scope="module")
def exact_moe_mediator(moe_family, tmp_path_factory):
    return exact_mediator(moe_family, tmp_path_factory.mktemp("moe-mediator") / "model")


def test_a_selected_route_holds_its_experts_fused_weights(moe_family, exact_moe_mediator):
    _, family = moe_family
    model = load(exact_moe_mediator)
    parts = [name for name in model.experts.tensors if ".experts." in name]
    assert parts and all(name in model._parts for name in parts)  # per-expert matrices of fused tensors
    held = dict(model.model.named_parameters())
    dense = {name: parameter.detach().clone() for name, parameter in held.items()}
    for task, fine_tune in zip(TASK_WORDS, family.fine_tunes):
        model.use_weights({task: 1.0})
        expert = dict(AutoModelForCausalLM.from_pretrained(fine_tune, dtype=torch.float32).named_parameters())
        for name in {model._parts[part] for part in parts}:  # θ − D and D + r each round once
            torch.testing.assert_close(held[name].detach(), expert[name].detach(), rtol=1e-6, atol=1e-7)
    model.use_weights({})
    assert all(torch.equal(held[name].detach(), dense[name]) for name in held)


def test_routing_sees_the_dense_model_whatever_the_fused_tensors_hold(exact_moe_mediator):
    model = load(exact_moe_mediator)
    ids = model.encode([text for words in TASK_WORDS.values() for text in prompts_for(words, 3, 5)])
    layers = model.router.settings.hidden_states(model.model.config.num_hidden_layers)
    dense_features = model.features(ids, layers)
    rng = random.Random(0)
    for mix in ({"numbers": 1.0}, dict(zip(TASK_WORDS, (rng.random() for _ in TASK_WORDS)))):
        model.use_weights(mix)
        held = {name: parameter.detach().clone() for name, parameter in model.model.named_parameters()}
        with model._dense_forward():
            assert torch.equal(model.features(ids, layers), dense_features)
        assert all(torch.equal(parameter.detach(), held[name]) for name, parameter in model.model.named_parameters())


@pytest.mark.parametrize("arch", ["qwen3_moe", *VISION_LANGUAGE_ARCHITECTURES])
def test_generate_routes_like_the_exported_expert(arch, exact_moe_mediator, tmp_path):
    folder = exact_moe_mediator
    if arch != "qwen3_moe":
        folder = exact_mediator(build_mediator_family(tmp_path / "family", arch), tmp_path / "mediator")
        manifest = json.loads((folder / "mediator" / "mediator.json").read_text())
        routed = list(manifest["routed_tensors"])
        assert routed and not any("vision" in name or "visual" in name or "projector" in name for name in routed)
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
