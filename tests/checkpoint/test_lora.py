"""`model+adapter` paths: a PEFT LoRA applied while streaming equals PEFT's own merge_and_unload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mergewise
from mergewise.checkpoint import ModelFolder
from mergewise.checkpoint.lora import AdaptedFolder
from mergewise.cli import main
from mergewise.engine import NonFiniteWarning
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
    wider = build_tiny_model(
        "llama", tmp_path / "wider", dtype=torch.float32, num_layers=2, hidden_size=128, intermediate_size=256
    )
    build_adapter(wider, tmp_path / "adapter")
    config = tmp_path / "recipe.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": f"{base}+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}],
            }
        )
    )
    capsys.readouterr()  # the models' build
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "do not fit" in error and "q_proj" in error
    assert not (tmp_path / "out").exists()


def test_a_lora_on_gpt2_conv1d_weights_merges_as_peft_merges_it(tmp_path):
    """GPT-2 stores its projections as (in, out): PEFT's fan_in_fan_out layout."""
    base = build_tiny_model("gpt2", tmp_path / "base", dtype=torch.float32, num_layers=2)
    expected = build_adapter(
        base, tmp_path / "adapter", seed=1, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True
    )
    recipe = {
        "merge_method": "linear",
        "models": [{"model": f"{base}+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}],
    }
    mergewise.merge(recipe, tmp_path / "out", quiet=True)
    for name, tensor in read_state_dict(tmp_path / "out").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ what an adapter may hold
@pytest.fixture(scope="module")
def adapted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_model("llama", root / "base", dtype=torch.float32, num_layers=2)
    build_adapter(base, root / "adapter")
    return base, root / "adapter"


def test_an_adapted_folder_reads_adapted_tensors_every_way(adapted):
    """`read(out=...)` refused the keyword, and `read_together` (ModelFolder's) left the adapter out."""
    base, adapter = adapted
    folder = AdaptedFolder(base, adapter)
    names = [name for name in folder.tensors if "q_proj" in name or "v_proj" in name]
    expected = [folder.read(name) for name in names]
    assert not torch.equal(expected[0], ModelFolder(base).read(names[0]))
    for tensor, wanted in zip(folder.read_together(names), expected, strict=True):
        assert torch.equal(tensor, wanted)
    out = torch.empty_like(expected[0])
    assert folder.read(names[0], out=out) is out and torch.equal(out, expected[0])


def edit_config(text: str | None = None, **changes):
    """A change of adapter_config.json: keys set (a value of "NaN" or "Infinity" written as that
    literal), or the whole text replaced."""

    def change(adapter: Path) -> Path:
        path = adapter / "adapter_config.json"
        config = {**json.loads(path.read_text()), **changes}
        path.write_text(
            text if text is not None else json.dumps(config).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
        )
        return path

    return change


def edit_factor(change_tensor, factor: str = "lora_A"):
    """A change of the first `factor` (lora_A or lora_B) in adapter_model.safetensors."""

    def change(adapter: Path) -> Path:
        path = adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        name = next(name for name in sorted(tensors) if name.endswith(f"{factor}.weight"))
        tensors[name] = change_tensor(tensors[name])
        save_file(tensors, path)
        return path

    return change


def with_nan(factor: torch.Tensor) -> torch.Tensor:
    factor = factor.clone()
    factor[0, 0] = float("nan")
    return factor


ADAPTER_BREAKAGES = {
    "rank 0": (edit_config(r=0), "r: Input should be greater than or equal to 1"),
    "rank Infinity": (edit_config(r="Infinity"), "Infinity is not a finite number"),
    "negative rank with rsLoRA": (edit_config(r=-4, use_rslora=True), "r: Input should be greater than or equal to 1"),
    "NaN lora_alpha": (edit_config(lora_alpha="NaN"), "NaN is not a finite number"),
    "nested 20 000 deep": (edit_config("[" * 20_000 + "]" * 20_000), "nested more than 64 levels deep"),
    "0-D factor": (edit_factor(lambda factor: factor[0, 0].clone()), "a LoRA factor of rank 4 is a matrix"),
    "1-D factor": (edit_factor(lambda factor: factor[0].clone()), "a LoRA factor of rank 4 is a matrix"),
    "3-D factor": (edit_factor(lambda factor: factor[None].clone()), "a LoRA factor of rank 4 is a matrix"),
    "NaN in a factor": (edit_factor(with_nan), "holds NaN or infinity"),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_BREAKAGES))
def test_a_broken_adapter_is_one_error_line_naming_it(case, adapted, tmp_path, capsys):
    base, built = adapted
    change, named = ADAPTER_BREAKAGES[case]
    adapter = Path(shutil.copytree(built, tmp_path / "adapter"))
    culprit = change(adapter)
    config = tmp_path / "recipe.yml"
    config.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
        )
    )
    capsys.readouterr()
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"error: {culprit}") and named in error
    assert not (tmp_path / "out").exists()


def test_values_an_adapter_overflows_to_are_blamed_on_the_adapter(adapted, tmp_path):
    base, built = adapted
    adapter = Path(shutil.copytree(built, tmp_path / "adapter"))
    for factor in ("lora_A", "lora_B"):  # each finite, their product past float32
        edit_factor(lambda values: torch.full_like(values, 1e30), factor)(adapter)
    recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
    with pytest.warns(NonFiniteWarning, match=f"NaN or infinity in {base} with adapter {adapter}"):
        mergewise.merge(recipe, tmp_path / "out", quiet=True)
