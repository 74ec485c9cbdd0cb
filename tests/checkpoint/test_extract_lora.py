"""`mergewise extract-lora`: a PEFT adapter from a fine-tune, loadable by peft; at full rank it
rebuilds the fine-tune's matrices, at lower ranks it reports what it lost."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mergewise.checkpoint.extract_lora import OVERSAMPLING, truncated_svd
from mergewise.cli import main
from tests.support.processes import run_measured
from tests.support.tiny_models import build_fine_tune, build_tiny_model, read_state_dict


def test_an_extracted_adapter_loads_in_peft_and_rebuilds_the_fine_tune(tmp_path, capsys):
    from peft import PeftModel  # imported here: it takes ~4 s, which every xdist worker would pay collecting

    base = build_tiny_model("llama", tmp_path / "base", dtype=torch.float32, num_layers=2)
    tuned = build_fine_tune(base, tmp_path / "tuned", seed=1, noise=0.05)
    assert main(["extract-lora", str(tuned), str(base), str(tmp_path / "full"), "--rank", "64", "--quiet"]) == 0
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "full"
    ).merge_and_unload()
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


def fine_tune_difference(rows: int, columns: int, seed: int) -> torch.Tensor:
    """What a fine-tune adds to a matrix: a few decaying directions over a flat tail of noise."""
    generator = torch.Generator().manual_seed(seed)
    structured = sum(
        0.8**index * torch.outer(torch.randn(rows, generator=generator), torch.randn(columns, generator=generator))
        for index in range(12)
    )
    noise = torch.randn(rows, columns, generator=generator)
    return structured / structured.norm() + 0.5 * noise / noise.norm()


def relative_error(matrix, left, values, right) -> float:
    return float((matrix - (left * values) @ right).norm() / matrix.norm())


@pytest.mark.parametrize("shape", [(384, 320), (320, 384)])
@pytest.mark.parametrize("rank", [4, 16])
def test_the_randomized_factorisation_loses_at_most_1_percent_more_than_the_exact_one(shape, rank):
    """Matrices wide enough for the sketch (both orientations) take the randomized path."""
    delta = fine_tune_difference(*shape, seed=rank)
    assert 2 * (rank + OVERSAMPLING) < min(shape)
    exact = torch.linalg.svd(delta, full_matrices=False)
    exact_error = relative_error(delta, exact[0][:, :rank], exact[1][:rank], exact[2][:rank])

    left, values, right = truncated_svd(delta, rank)

    assert left.shape == (shape[0], rank) and values.shape == (rank,) and right.shape == (rank, shape[1])
    assert exact_error <= relative_error(delta, left, values, right) <= 1.01 * exact_error
    assert bool((values <= exact[1][:rank] * (1 + 1e-5)).all())  # a projection's values never exceed the matrix's
    again = truncated_svd(delta, rank)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip((left, values, right), again))  # seeded


def test_a_matrix_narrow_for_the_sketch_gets_the_exact_factorisation():
    delta = fine_tune_difference(64, 48, seed=1)
    rank = 16  # a sketch of 24 columns is half of 48
    left, values, right = truncated_svd(delta, rank)
    exact = torch.linalg.svd(delta, full_matrices=False)
    assert torch.equal(left, exact[0][:, :rank]) and torch.equal(values, exact[1][:rank])
    assert torch.equal(right, exact[2][:rank])


def test_a_rank_below_one_is_one_error_line(tmp_path, capsys):
    base = build_tiny_model("llama", tmp_path / "base", dtype=torch.float32, num_layers=2)
    capsys.readouterr()
    assert main(["extract-lora", str(base), str(base), str(tmp_path / "out"), "--rank", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --rank: must be at least 1, got 0"


@pytest.mark.integration
def test_a_rank_past_every_matrix_is_refused_before_any_allocation(tmp_path):
    """Every factor is padded to the rank, so a rank of millions on a 64 × 160 model took 7 GB."""
    base = build_tiny_model(
        "llama", tmp_path / "base", dtype=torch.float32, num_layers=1, hidden_size=64, intermediate_size=160
    )
    run_measured(
        "extract-lora", str(base), str(base), str(tmp_path / "out"), "--rank", "2000000", "--quiet"
    ).assert_one_error("--rank: 2000000 is more than the rank of any weight matrix", "(at most 64)")
    assert not (tmp_path / "out").exists()


def test_nan_in_the_fine_tune_is_one_error_line_naming_it(tmp_path, capsys):
    base = build_tiny_model("llama", tmp_path / "base", dtype=torch.float32, num_layers=1)
    tuned = build_fine_tune(base, tmp_path / "tuned", seed=1)
    tensors = load_file(tuned / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["extract-lora", str(tuned), str(base), str(tmp_path / "out"), "--rank", "4", "--quiet"]) == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error == (
        f"error: tensor model.layers.0.mlp.up_proj.weight: {tuned} holds NaN or infinity (or their "
        "difference overflows)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_full_disk_is_one_error_line_naming_the_file(tmp_path):
    base = build_tiny_model("llama", tmp_path / "base", dtype=torch.float32, num_layers=1)
    tuned = build_fine_tune(base, tmp_path / "tuned", seed=1)
    run_measured(
        "extract-lora", str(tuned), str(base), str(tmp_path / "out"), "--rank", "8", "--quiet", file_size_limit=4000
    ).assert_one_error("adapter_model.safetensors: cannot write")
    assert not (tmp_path / "out").exists() and sorted(tmp_path.glob(".out.*")) == []
