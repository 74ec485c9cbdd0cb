"""`mergewise extract-lora`: a PEFT adapter from a fine-tune, loadable by peft; at full rank it
rebuilds the fine-tune's matrices, at lower ranks it reports what it lost."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mergewise.cli import main
from tests.support.tiny_models import build_fine_tune, build_tiny_model, read_state_dict


def test_an_extracted_adapter_loads_in_peft_and_rebuilds_the_fine_tune(tmp_path, capsys):
    base = build_tiny_model("llama", tmp_path / "base", dtype=torch.float32, num_layers=2)
    tuned = build_fine_tune(base, tmp_path / "tuned", seed=1, noise=0.05)
    assert main(["extract-lora", str(tuned), str(base), str(tmp_path / "full"), "--rank", "64", "--quiet"]) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      tmp_path / "full").merge_and_unload()
    expected, base_state = read_state_dict(tuned), read_state_dict(base)
    for name, tensor in model.state_dict().items():
        target = expected[name] if "proj" in name else base_state[name]  # embeddings and head stay the base's
        torch.testing.assert_close(tensor, target, rtol=1e-4, atol=1e-5)

    errors = {}
    for rank in (2, 8):
        assert main(["extract-lora", str(tuned), str(base), str(tmp_path / f"r{rank}"), "--rank", str(rank)]) == 0
        assert capsys.readouterr().out.strip().endswith(f"adapter written to {tmp_path / f'r{rank}'}")
        errors[rank] = json.loads((tmp_path / f"r{rank}" / "extraction.json").read_text())["relative_error"]
    assert all(0 < errors[8][module] < errors[2][module] < 1 for module in errors[2])


def test_a_rank_below_one_is_one_error_line(tmp_path, capsys):
    base = build_tiny_model("llama", tmp_path / "base", dtype=torch.float32, num_layers=2)
    capsys.readouterr()
    assert main(["extract-lora", str(base), str(base), str(tmp_path / "out"), "--rank", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --rank: must be at least 1, got 0"
