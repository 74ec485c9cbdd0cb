"""Mediator on mixture-of-experts models: the checkpoint stores one matrix per MoE expert and
transformers holds all of a layer's experts in one fused tensor; the runtime routes each stored
matrix in place, inside the fused tensor (tests/test_architectures.py runs every family end to end)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergewise.mediator.runtime import load
from tests.support.tiny_mediator import TASK_WORDS, build_exact_mediator, build_mediator_family, prompts_for


@pytest.fixture(scope="module")
def moe_family(tmp_path_factory):
    return build_mediator_family(tmp_path_factory.mktemp("moe-family"), "qwen3_moe")


@pytest.fixture(scope="module")
def exact_moe_mediator(moe_family, tmp_path_factory):
    return build_exact_mediator(moe_family, tmp_path_factory.mktemp("moe-mediator") / "model")


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
