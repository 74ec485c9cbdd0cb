"""LoRA adapters on models whose checkpoints are not named as transformers' module tree: mixture-of-
experts checkpoints keep one matrix per expert where the module tree fuses them into 3-D tensors,
and multimodal ones name the language model otherwise. `extract-lora` writes factors where PEFT
attaches them (`target_parameters` for the fused tensors), and `model+adapter` paths apply such
adapters to the checkpoint tensors as PEFT's own merge does."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GptOssConfig

import mergewise
from mergewise.adapter_targets import expert_factors, pack_expert_factors
from mergewise.checkpoint import ModelFolder
from mergewise.cli import main
from tests.support.tiny_models import (
    MOE_ARCHITECTURES,
    build_fine_tune,
    build_lora_adapter,
    build_tiny_model,
    build_tiny_vision_language_model,
    read_state_dict,
    save_tokenizer,
)

EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]


def module_tree(folder, auto=AutoModelForCausalLM) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as transformers' module tree holds them (experts fused)."""
    return auto.from_pretrained(folder, dtype=torch.float32).state_dict()


def peft_merged(base, adapter, auto=AutoModelForCausalLM) -> dict[str, torch.Tensor]:
    """PEFT's own merge of `adapter` into `base`, with any weight PEFT could not place an error."""
    from peft import PeftModel  # imported here: it takes seconds, which every xdist worker would pay collecting

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(missing|unexpected).*", category=UserWarning)
        model = PeftModel.from_pretrained(auto.from_pretrained(base, dtype=torch.float32), adapter)
    return model.merge_and_unload().state_dict()


def build_moe(arch: str, folder: Path) -> Path:
    """A tiny float32 MoE: one of the matrix-per-expert checkpoints, or GPT-OSS, whose checkpoint
    stores its experts fused and transposed (experts, in, out), as its module tree holds them."""
    if arch != "gpt_oss":
        return build_tiny_model(arch, folder, dtype=torch.float32, num_layers=2)
    config = GptOssConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_tokenizer(folder, config.vocab_size)
    return folder


@pytest.mark.parametrize("arch", [*MOE_ARCHITECTURES, "gpt_oss"])
def test_an_adapter_extracted_from_a_moe_fine_tune_rebuilds_its_experts_in_peft(arch, tmp_path, capsys):
    base = build_moe(arch, tmp_path / "base")
    tuned = build_fine_tune(base, tmp_path / "tuned", seed=1, noise=0.05)
    out = tmp_path / "adapter"
    assert main(["extract-lora", str(tuned), str(base), str(out), "--rank", "64", "--quiet"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    fused = [name for name in config["target_parameters"] if name.endswith(("gate_up_proj", "down_proj"))]
    assert len(fused) == 2 * 2  # both fused expert tensors of both layers
    merged, expected, original = peft_merged(base, out), module_tree(tuned), module_tree(base)
    changed = [name for name in merged if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(changed) == 2 * 2 and all(merged[name].dim() == 3 for name in changed)
    for name, tensor in merged.items():
        kept = tensor.dim() < 2 or "embed" in name or "lm_head" in name or name.endswith("bias")
        torch.testing.assert_close(tensor, original[name] if kept else expected[name], rtol=1e-4, atol=1e-5)
    errors = json.loads((out / "extraction.json").read_text())["relative_error"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in errors and max(errors.values()) < 1e-5
    # and read back as a `model+adapter` path, it rebuilds the fine-tune's checkpoint tensors
    recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{out}", "parameters": {"weight": 1.0}}]}
    rebuilt, tuned_tensors = (
        read_state_dict(mergewise.merge(recipe, tmp_path / "rebuilt", quiet=True).out_dir),
        read_state_dict(tuned),
    )
    for name, tensor in rebuilt.items():
        if "experts" in name and not name.endswith("bias"):
            torch.testing.assert_close(tensor, tuned_tensors[name], rtol=1e-4, atol=1e-5)

    assert main(["extract-lora", str(tuned), str(base), str(tmp_path / "r2"), "--rank", "2", "--quiet"]) == 0
    low = json.loads((tmp_path / "r2" / "extraction.json").read_text())["relative_error"]
    assert all(0 < low[name] < 1 for name in low if "experts" in name)
    assert low["model.layers.0.mlp.experts.gate_up_proj"] > errors["model.layers.0.mlp.experts.gate_up_proj"]


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_a_peft_adapter_on_fused_experts_merges_as_peft_merges_it(arch, tmp_path):
    base = build_tiny_model(arch, tmp_path / "base", dtype=torch.float32, num_layers=2)
    adapter = tmp_path / "adapter"
    expected = build_lora_adapter(base, adapter, rank=2, target_modules=["q_proj"], target_parameters=EXPERT_PARAMETERS)
    recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
    out = Path(mergewise.merge(recipe, tmp_path / "out", quiet=True))
    merged, original = module_tree(out), module_tree(base)
    assert not torch.equal(
        merged["model.layers.1.mlp.experts.down_proj"], original["model.layers.1.mlp.experts.down_proj"]
    )
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3"])
def test_an_adapter_extracted_from_a_multimodal_fine_tune_loads_in_peft_and_rebuilds_it(arch, tmp_path):
    """LLaVA's checkpoint names its language model `language_model.model.*`, the module tree
    `model.language_model.*`; Qwen2-VL's vision merger has a linear layer named `0`, a leaf name its
    vision blocks share; Gemma 3's vision head holds tensors of its own (`probe`, `in_proj_weight`),
    left as they are."""
    base = build_tiny_vision_language_model(tmp_path / "base", arch=arch, dtype=torch.float32)
    tuned = build_fine_tune(base, tmp_path / "tuned", seed=1, noise=0.05)
    out = tmp_path / "adapter"
    full = max(min(info.shape) for info in ModelFolder(base).tensors.values() if len(info.shape) == 2)
    assert main(["extract-lora", str(tuned), str(base), str(out), "--rank", str(full), "--quiet"]) == 0
    merged = peft_merged(base, out, AutoModelForImageTextToText)
    expected, original = module_tree(tuned, AutoModelForImageTextToText), module_tree(base, AutoModelForImageTextToText)
    for name, tensor in merged.items():
        weight = tensor.dim() == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name
        torch.testing.assert_close(tensor, expected[name] if weight else original[name], rtol=1e-4, atol=1e-5)
    recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{out}", "parameters": {"weight": 1.0}}]}
    rebuilt, tuned_tensors = (
        read_state_dict(mergewise.merge(recipe, tmp_path / "rebuilt", quiet=True).out_dir),
        read_state_dict(tuned),
    )
    for name in rebuilt:
        if "language_model" in name and name.endswith("proj.weight"):
            torch.testing.assert_close(rebuilt[name], tuned_tensors[name], rtol=1e-4, atol=1e-5)


def test_expert_factors_unpack_what_pack_expert_factors_packs():
    generator = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(3, 5, generator=generator), torch.randn(7, 3, generator=generator)) for _ in range(4)]
    down, up = pack_expert_factors(pairs)
    assert down.shape == (12, 5) and up.shape == (7, 12)
    for (down_e, up_e), (found_down, found_up) in zip(pairs, expert_factors(down, up, 4), strict=True):
        assert torch.equal(down_e, found_down) and torch.equal(up_e, found_up)


def test_an_expert_adapter_on_a_model_without_those_experts_is_one_error_line(tmp_path, capsys):
    moe = build_tiny_model("mixtral", tmp_path / "moe", dtype=torch.float32, num_layers=2)
    dense = build_tiny_model("llama", tmp_path / "dense", dtype=torch.float32, num_layers=2)
    adapter = tmp_path / "adapter"
    build_lora_adapter(moe, adapter, rank=2, target_modules=[], target_parameters=EXPERT_PARAMETERS)
    recipe = tmp_path / "recipe.yml"
    models = [{"model": f"{dense}+{adapter}", "parameters": {"weight": 1.0}}]
    recipe.write_text(json.dumps({"merge_method": "linear", "models": models}))
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"error: {adapter}: does not fit {dense} (") and "target_parameters" in error
    assert not (tmp_path / "out").exists()
