"""`model+adapter` paths: a PEFT LoRA applied while streaming equals PEFT's own merge_and_unload."""

from __future__ import annotations

import torch
import yaml

import mergewise
from mergewise.cli import main
from tests.support.tiny_models import build_lora_adapter as build_adapter
from tests.support.tiny_models import build_tiny_model, read_state_dict


def test_a_lora_path_merges_as_peft_merges_it(tmp_path):
    base = build_tiny_model("llama", tmp_path / "base", dtype=torch.float32, num_layers=2)
    for rslora in (False, True):
        adapter = tmp_path / f"adapter-{rslora}"
        expected = build_adapter(base, adapter, use_rslora=rslora)
        recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
        out = tmp_path / f"out-{rslora}"
        mergewise.merge(recipe, out, quiet=True)
        merged = read_state_dict(out)
        changed = [name for name in merged if "q_proj" in name or "v_proj" in name]
        assert changed and not torch.equal(merged[changed[0]], read_state_dict(base)[changed[0]])
        for name, tensor in merged.items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)


def test_an_adapter_of_another_model_is_one_error_line(tmp_path, capsys):
    base = build_tiny_model("llama", tmp_path / "base", dtype=torch.float32, num_layers=2)
    wider = build_tiny_model("llama", tmp_path / "wider", dtype=torch.float32, num_layers=2, hidden_size=128,
                             intermediate_size=256)
    build_adapter(wider, tmp_path / "adapter")
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": f"{base}+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}]}))
    capsys.readouterr()  # the models' build
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "do not fit" in error and "q_proj" in error
    assert not (tmp_path / "out").exists()


def test_a_lora_on_gpt2_conv1d_weights_merges_as_peft_merges_it(tmp_path):
    """GPT-2 stores its projections as (in, out): PEFT's fan_in_fan_out layout."""
    base = build_tiny_model("gpt2", tmp_path / "base", dtype=torch.float32, num_layers=2)
    expected = build_adapter(base, tmp_path / "adapter", seed=1, lora_alpha=4, target_modules=["c_attn"],
                             fan_in_fan_out=True)
    recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'adapter'}",
                                                    "parameters": {"weight": 1.0}}]}
    mergewise.merge(recipe, tmp_path / "out", quiet=True)
    for name, tensor in read_state_dict(tmp_path / "out").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
