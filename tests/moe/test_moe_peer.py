"""`mergewise moe` against mergekit-moe 0.1.5 on the same recipes and files: the same tensor names,
shapes and config; every weight identical but the hidden-state gates, which are equal within bf16
rounding (mergekit-moe averages and normalises the bf16 hidden states in bf16, mergewise in float32);
random gates and `noise_scale` noise are identical under the same seed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from mergewise.moe import build_moe, plan_moe
from tests.moe.test_moe import PROMPTS
from tests.support.tiny_models import read_state_dict

RUNNER = Path(__file__).parents[1] / "support" / "mergekit_moe_runner.py"
SEED = 11
# |mergewise − mergekit| allowed on a hidden-state gate, relative to the gate's largest entry: a couple
# of bf16 steps (2⁻⁸ relative each) from mergekit's bf16 sums and divisions; at most 6.0e-3 measured
GATE_TOLERANCE = 1e-2

pytestmark = [
    pytest.mark.integration,
    pytest.mark.peer,
    pytest.mark.skipif(
        importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed (pip install '.[peer]')"
    ),
]


def _experts(arch: str, count: int, **extra) -> list[dict]:
    return [
        {"source_model": f"{arch}/ft{index + 1}", "positive_prompts": PROMPTS[index], **extra} for index in range(count)
    ]


GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
# each output architecture: the family its experts come from, and the shared experts it takes (mergekit-
# moe 0.1.5 opens no loader for a shared expert that is neither the base nor an expert)
OUTPUTS = {
    "mixtral": ("llama", None),
    "deepseek": ("llama", [{"source_model": "llama/base"}]),
    "qwen": ("qwen2", [{"source_model": "qwen2/base", "positive_prompts": PROMPTS[2]}]),
    "qwen3": ("qwen3", None),
}


def _case(output: str, mode: str) -> tuple[str, dict]:
    arch, shared = OUTPUTS[output]
    recipe = {"base_model": f"{arch}/base", "architecture": output, "gate_mode": mode, "experts": _experts(arch, 2)}
    return arch, {**recipe, **({"shared_experts": shared} if shared else {})}


# name → (architecture family of the inputs, recipe); model paths are relative to the families' root
CASES: dict[str, tuple[str, dict]] = {
    **{f"{output}-{mode}": _case(output, mode) for output in OUTPUTS for mode in GATE_MODES},
    "mixtral-three-experts-negative-prompts-noise": (
        "llama",
        {
            "base_model": "llama/base",
            "dtype": "float32",
            "experts_per_token": 1,
            "experts": [
                {**_experts("llama", 3)[0], "negative_prompts": PROMPTS[2], "noise_scale": 0.01, "residual_scale": 0.5},
                {**_experts("llama", 3)[1], "noise_scale": 0.02},
                _experts("llama", 3)[2],
            ],
        },
    ),
    "mixtral-from-mistral": ("mistral", {"base_model": "mistral/base", "experts": _experts("mistral", 2)}),
    "qwen-from-llama-noise": (
        "llama",
        {
            "base_model": "llama/base",
            "architecture": "qwen",
            "gate_mode": "random",
            "experts": _experts("llama", 2, noise_scale=0.01),
            "shared_experts": [{"source_model": "llama/ft1", "noise_scale": 0.01}],
        },
    ),
    "deepseek-noise": (
        "llama",
        {
            "base_model": "llama/base",
            "architecture": "deepseek",
            "gate_mode": "uniform_random",
            "experts": _experts("llama", 3, noise_scale=0.01),
        },
    ),
}
# recipes mergekit-moe 0.1.5 fails on, and what it raises: it opens no loader for a shared expert that
# is neither the base nor an expert
MERGEKIT_FAILS = {
    "qwen-shared-of-its-own": (
        "llama",
        {
            "base_model": "llama/base",
            "architecture": "qwen",
            "experts": _experts("llama", 2),
            "shared_experts": [{"source_model": "llama/ft3", "positive_prompts": PROMPTS[2]}],
        },
    ),
}
FAILURES = {"qwen-shared-of-its-own": "'NoneType' object has no attribute 'get_tensor'"}


@pytest.fixture(scope="module")
def peer_outputs(tmp_path_factory, tiny_family) -> Path:
    """Every case built by mergekit-moe (one process) and by mergewise, under one root."""
    root = tmp_path_factory.mktemp("moe-peer")
    every = {**CASES, **MERGEKIT_FAILS}
    for arch in sorted({arch for arch, _ in every.values()}):
        family = tiny_family(arch, noise=0.05)
        (root / arch).symlink_to(family.base.parent)
    jobs = []
    for name, (_, recipe) in every.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        jobs.append(
            {
                "name": name,
                "recipe": f"{name}.yml",
                "out": str(root / f"mergekit-{name}"),
                "cwd": str(root),
                "seed": SEED,
            }
        )
    (root / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run(
        [sys.executable, str(RUNNER), str(root / "jobs.json"), str(root / "results.json")],
        check=True,
        capture_output=True,
    )
    for name in every:
        build_moe(plan_moe(root / f"{name}.yml"), root / f"mergewise-{name}", seed=SEED, quiet=True)
    return root


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_model_as_mergekit_moe(peer_outputs, name):
    results = json.loads((peer_outputs / "results.json").read_text())
    assert results[name]["built"], results[name]
    ours, theirs = (read_state_dict(peer_outputs / f"{tool}-{name}") for tool in ("mergewise", "mergekit"))
    assert sorted(ours) == sorted(theirs)
    hidden_gates = CASES[name][1].get("gate_mode", "hidden").startswith("hidden")
    for tensor, expected in theirs.items():
        got = ours[tensor]
        assert (got.shape, got.dtype) == (expected.shape, expected.dtype), tensor
        if tensor.endswith("gate.weight") and hidden_gates:
            error = (got.float() - expected.float()).abs().max() / expected.float().abs().max()
            assert error <= GATE_TOLERANCE, f"{tensor}: {error:.2e}"
        else:
            assert torch.equal(got, expected), tensor
    configs = [
        json.loads((peer_outputs / f"{tool}-{name}" / "config.json").read_text()) for tool in ("mergewise", "mergekit")
    ]
    for config in configs:
        config.pop("_name_or_path", None)  # where each tool was told the base is
    assert configs[0] == configs[1]
    if configs[0]["model_type"] != "deepseek":  # DeepSeek MoE's code is on the Hub (trust_remote_code)
        assert AutoConfig.from_pretrained(peer_outputs / f"mergewise-{name}").model_type == configs[0]["model_type"]


@pytest.mark.parametrize("name", sorted(MERGEKIT_FAILS))
def test_recipes_mergekit_moe_fails_on_build_and_load(peer_outputs, name):
    result = json.loads((peer_outputs / "results.json").read_text())[name]
    assert not result["built"] and FAILURES[name] in result["error"]
    model = AutoModelForCausalLM.from_pretrained(peer_outputs / f"mergewise-{name}")
    shared = read_state_dict(peer_outputs / MERGEKIT_FAILS[name][1]["shared_experts"][0]["source_model"])
    assert torch.equal(
        model.model.layers[0].mlp.shared_expert.up_proj.weight, shared["model.layers.0.mlp.up_proj.weight"]
    )
