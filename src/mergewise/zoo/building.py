"""Shared zoo-building steps: seeding, atomic model folders, resumable bookkeeping in zoo.json,
task vector norms and the example merge configs."""

from __future__ import annotations

import json
import platform
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergewise._version import __version__
from mergewise.errors import MergewiseError
from mergewise.zoo.manifest import read_manifest_dict, write_manifest_dict

TEMPORARY_PREFIX = ".building-"


def derived_seed(seed: int, purpose: str) -> int:
    """A stable per-purpose seed, so adding a task never changes another task's data or training."""
    return zlib.crc32(f"{seed}:{purpose}".encode()) & 0x7FFFFFFF


def library_versions() -> dict[str, str]:
    return {
        "mergewise": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def open_manifest(zoo_dir: Path, size: str, seed: int) -> dict:
    """The zoo.json to extend: the existing one when resuming the same build, else a fresh one."""
    zoo_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest_dict(zoo_dir)
    if manifest is None:
        return {"size": size, "seed": seed, "models": {}}
    if manifest.get("size") != size or manifest.get("seed") != seed:
        raise MergewiseError(
            f"{zoo_dir / 'zoo.json'}: holds a zoo of size '{manifest.get('size')}' seed {manifest.get('seed')}; "
            f"refusing to resume it as size '{size}' seed {seed} (use another folder)"
        )
    manifest.setdefault("models", {})
    return manifest


def is_finished(zoo_dir: Path, manifest: dict, name: str) -> bool:
    """A model counts as built only when zoo.json records it and its folder is in place."""
    return name in manifest["models"] and (zoo_dir / name / "config.json").is_file()


def build_model_once(
    zoo_dir: Path,
    manifest: dict,
    name: str,
    train: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]],
    dtype: torch.dtype = torch.float32,
) -> bool:
    """Train and save `name` unless a finished copy exists; returns whether it was (re)built.

    The folder is written under a temporary name and renamed into place, then zoo.json records it:
    an interrupted build leaves no half-written model that a resume would mistake for a finished one.
    `train` seeds torch's global random stream (initialisation and dropout draw from it) in a fork of
    it: the caller's stream is as it was afterwards."""
    if is_finished(zoo_dir, manifest, name):
        return False
    started = time.perf_counter()
    with torch.random.fork_rng():
        model, tokenizer, record = train()
    temporary = zoo_dir / f"{TEMPORARY_PREFIX}{name}"
    shutil.rmtree(temporary, ignore_errors=True)
    model.to(dtype).save_pretrained(temporary)  # type: ignore[arg-type]  # transformers' stub: `to` takes the model
    tokenizer.save_pretrained(temporary)
    final = zoo_dir / name
    shutil.rmtree(final, ignore_errors=True)
    temporary.rename(final)
    record["seconds"] = round(time.perf_counter() - started, 1)
    manifest["models"][name] = record
    write_manifest_dict(zoo_dir, manifest)
    return True


def task_vector_ratio(base: PreTrainedModel, expert: PreTrainedModel) -> float:
    """‖θ_expert − θ_base‖ / ‖θ_base‖ over all parameters: how far fine-tuning moved the weights."""
    base_parameters = dict(base.named_parameters())
    delta_squared = base_squared = 0.0
    for name, parameter in expert.named_parameters():
        reference = base_parameters[name].detach().float()
        delta_squared += (parameter.detach().float() - reference).pow(2).sum().item()
        base_squared += reference.pow(2).sum().item()
    return round((delta_squared / base_squared) ** 0.5, 5)


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_eval_jsonl(path: Path, examples: list[tuple[str, str]]) -> None:
    write_lines(path, [json.dumps({"prompt": prompt, "answer": answer}) for prompt, answer in examples])


def write_example_configs(zoo_dir: Path, base: str, experts: list[str], dtype: str) -> list[str]:
    """Ready-to-run mergekit-style configs; model paths are relative to `configs/`."""
    configs_dir = zoo_dir / "configs"
    configs_dir.mkdir(exist_ok=True)
    relative = [f"../{expert}" for expert in experts]
    share = round(1.0 / len(experts), 6)
    configs = {
        "linear.yml": {
            "merge_method": "linear",
            "models": [{"model": path, "parameters": {"weight": share}} for path in relative],
            "dtype": dtype,
        },
        "task_arithmetic.yml": {
            "merge_method": "task_arithmetic",
            "base_model": f"../{base}",
            "models": [{"model": path, "parameters": {"weight": 0.5}} for path in relative],
            "dtype": dtype,
        },
        "ties.yml": {
            "merge_method": "ties",
            "base_model": f"../{base}",
            "models": [{"model": path, "parameters": {"weight": 1.0, "density": 0.5}} for path in relative],
            "parameters": {"normalize": True},
            "dtype": dtype,
        },
    }
    for file_name, config in configs.items():
        (configs_dir / file_name).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return [f"configs/{file_name}" for file_name in configs]
