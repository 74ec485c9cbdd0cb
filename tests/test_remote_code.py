"""Model folders come from strangers: Python code a folder names (`auto_map`) runs only with
--trust-remote-code, never because someone answered "y" to a prompt."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import yaml
from transformers import dynamic_module_utils

from mergewise.cli import main
from tests.support.tiny_models import build_fine_tune, build_tiny_model

# Importing it leaves a marker; the classes make a trusted folder load for real.
EVIL_CODE = """\
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("PWNED")


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def add_code(folder: Path, names_code_in: str) -> Path:
    """Make `folder` name evil.py for its model ("config") or its tokenizer ("tokenizer").

    The type names must be unknown to transformers: it ignores `auto_map` for types it has itself."""
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(folder / "PWNED")))
    if names_code_in == "config":
        edit_json(
            folder / "config.json",
            model_type="evil",
            auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
        )
    else:
        edit_json(
            folder / "tokenizer_config.json",
            tokenizer_class="EvilTokenizer",
            auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]},
        )
    return folder


def tiny_zoo(root: Path) -> Path:
    """A one-task zoo for `mergewise eval`, one prompt and a line of general text."""
    root.mkdir()
    (root / "zoo.json").write_text(
        json.dumps(
            {
                "base": "base",
                "general": {"eval": "general.txt"},
                "tasks": {
                    "t": {"expert": None, "calibration": "calib.txt", "eval": "eval.jsonl", "metric": "exact_match"}
                },
            }
        )
    )
    (root / "eval.jsonl").write_text(json.dumps({"prompt": "the quick", "answer": " fox"}) + "\n")
    (root / "general.txt").write_text("the quick brown fox jumps over the lazy dog\n")
    return root


def command(name: str, folder: Path, tmp_path: Path) -> list[str]:
    if name == "generate":
        return ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]
    if name == "calibrate":
        return [
            "calibrate",
            str(folder),
            str(tmp_path / "out.safetensors"),
            "--samples",
            "1",
            "--seq-len",
            "8",
            "--quiet",
        ]
    return ["eval", str(folder), "--zoo", str(tiny_zoo(tmp_path / "zoo"))]


@pytest.fixture
def answers_yes(monkeypatch):
    """What a user at transformers' "run the custom code? [y/N]" prompt might type."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))


@pytest.mark.parametrize("names_code_in", ["config", "tokenizer"])
@pytest.mark.parametrize("name", ["generate", "calibrate", "eval"])
def test_folder_code_is_refused_without_the_flag(name, names_code_in, tmp_path, answers_yes, capsys):
    folder = add_code(build_tiny_model("llama", tmp_path / "model"), names_code_in)
    arguments = command(name, folder, tmp_path)
    capsys.readouterr()  # the build's progress
    assert main(arguments) == 2
    captured = capsys.readouterr()
    assert "Do you wish" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(folder) in lines[0] and "--trust-remote-code" in lines[0] and "only if you trust" in lines[0]
    assert not (folder / "PWNED").exists()


def test_auto_map_of_a_known_type_is_ignored(tmp_path, answers_yes):
    """transformers' own class for a type it knows wins over the folder's code: no error, no import."""
    folder = add_code(build_tiny_model("llama", tmp_path / "model"), "config")
    edit_json(folder / "config.json", model_type="llama")
    assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert not (folder / "PWNED").exists()


def test_merge_never_imports_folder_code(tmp_path, answers_yes):
    base = build_tiny_model("llama", tmp_path / "base")
    tunes = [build_fine_tune(base, tmp_path / f"ft{seed}", seed=seed) for seed in (1, 2)]
    for folder in (base, *tunes):
        add_code(folder, "config")
        add_code(folder, "tokenizer")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(base),
                "dtype": "bfloat16",
                "models": [{"model": str(tune), "parameters": {"weight": 1.0, "density": 0.5}} for tune in tunes],
            }
        )
    )
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not any((folder / "PWNED").exists() for folder in (base, *tunes))


@pytest.mark.parametrize("name", ["generate", "calibrate", "eval"])
def test_the_flag_lets_trusted_code_run(name, tmp_path, monkeypatch):
    """With the flag the folder loads through its own classes (the marker shows its code ran)."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not ~/.cache
    monkeypatch.setattr(sys, "path", list(sys.path))  # transformers adds the modules cache to it
    folder = add_code(build_tiny_model("llama", tmp_path / "model"), "config")
    more = ["--stream-layers"] if name == "calibrate" else []  # also builds the model from its config
    assert main([*command(name, folder, tmp_path), *more, "--trust-remote-code"]) == 0
    assert (folder / "PWNED").exists()
