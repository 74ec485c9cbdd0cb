"""End-to-end merges of tiny checkpoints of every architecture: the output folder is a complete
Hugging Face model that transformers loads and runs, and its tensors are what the recipe asks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import mergewise
from mergewise.cli import main
from tests.support.tiny_models import ARCHITECTURES, Family, read_state_dict

TIED_EMBEDDING_ARCHS = {"gemma", "gpt2"}
DEPTH_KEYS = ("num_hidden_layers", "n_layer")


# ------------------------------------------------------------------------------------------ recipes
def weighted(paths, weights, **more) -> list[dict]:
    return [{"model": str(path), "parameters": {"weight": weight, **more}} for path, weight in zip(paths, weights)]


def linear_recipe(family: Family, weights=(0.5, 0.3, 0.2), dtype="bfloat16") -> dict:
    return {"merge_method": "linear", "dtype": dtype, "models": weighted(family.fine_tunes, weights)}


def ties_recipe(family: Family) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(family.base),
        "dtype": "bfloat16",
        "models": weighted(family.fine_tunes, (1.0, 0.7, 0.4), density=0.5),
    }


def slerp_recipe(family: Family) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": str(family.base),
        "dtype": "bfloat16",
        "models": [{"model": str(family.base)}, {"model": str(family.fine_tunes[0])}],
        "parameters": {"t": 0.4},
    }


def frankenmerge_recipe(family: Family) -> dict:
    """Layers 0–1 of fine-tune 1, then layer 1 of fine-tune 2 again: 3 layers from 2-layer models."""
    return {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "slices": [
            {"sources": [{"model": str(family.fine_tunes[0]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(family.fine_tunes[1]), "layer_range": [1, 2]}]},
        ],
    }


def dare_ties_recipe(family: Family) -> dict:
    return {
        "merge_method": "dare_ties",
        "base_model": str(family.base),
        "dtype": "bfloat16",
        "models": weighted(family.fine_tunes, (1.0, 0.7, 0.4), density=0.5),
    }


RECIPES = {"linear": linear_recipe, "ties": ties_recipe, "slerp": slerp_recipe, "frankenmerge": frankenmerge_recipe}
DEPTH = {"frankenmerge": 3}  # output layers, where the recipe changes the source's 2


def merge_cli(tmp_path: Path, recipe: dict, out_name: str = "out", *flags: str) -> Path:
    config = tmp_path / f"{out_name}.yml"
    config.write_text(yaml.safe_dump(recipe))
    out_dir = tmp_path / out_name
    assert main(["merge", str(config), str(out_dir), "--quiet", *flags]) == 0
    return out_dir


def layer_tensor(state: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The tensors of one decoder layer, by their name within the layer."""
    found = {}
    for name, value in state.items():
        parts = name.split(".")
        for position, part in enumerate(parts[:-1]):
            if part.isdigit():
                if int(part) == layer:
                    found[".".join(parts[position + 1 :])] = value
                break
    return found


def assert_runs(out_dir: Path) -> AutoModelForCausalLM:
    """Loads with transformers without missing or unexpected weights, and generates."""
    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    inputs = tokenizer("model merging combines the weights", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(
            **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert torch.isfinite(logits).all()
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    return model


# ------------------------------------------------------------------------------- per-arch merges
@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merged_folder_is_a_complete_loadable_model(arch, recipe_name, tiny_family, tmp_path):
    family = tiny_family(arch)
    out_dir = merge_cli(tmp_path, RECIPES[recipe_name](family), "out", "--seed", "11")

    config = json.loads((out_dir / "config.json").read_text())
    source_config = json.loads((family.base / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    depth_key = next(key for key in DEPTH_KEYS if key in config)
    assert config[depth_key] == DEPTH.get(recipe_name, source_config[depth_key])
    if isinstance(config.get("layer_types"), list):
        assert len(config["layer_types"]) == config[depth_key]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out_dir / name).read_bytes() == (family.base / name).read_bytes()
    record = yaml.safe_load((out_dir / "mergewise.yml").read_text())
    assert record["seed"] == 11 and record["mergewise_version"] == mergewise.__version__
    assert record["recipe"]["merge_method"] == RECIPES[recipe_name](family)["merge_method"]

    state = read_state_dict(out_dir)
    assert all(tensor.dtype == torch.bfloat16 for tensor in state.values())
    model = assert_runs(out_dir)
    assert model.config.get_text_config().num_hidden_layers == DEPTH.get(recipe_name, 2)
    assert ("lm_head.weight" in state) == (arch not in TIED_EMBEDDING_ARCHS)
    if arch in TIED_EMBEDDING_ARCHS:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_frankenmerge_stacks_the_requested_layers_unchanged(arch, tiny_family, tmp_path):
    family = tiny_family(arch)
    merged = read_state_dict(merge_cli(tmp_path, frankenmerge_recipe(family)))
    first, second = read_state_dict(family.fine_tunes[0]), read_state_dict(family.fine_tunes[1])
    expected_layers = [layer_tensor(first, 0), layer_tensor(first, 1), layer_tensor(second, 1)]
    for index, expected in enumerate(expected_layers):
        actual = layer_tensor(merged, index)
        assert actual.keys() == expected.keys() and actual
        assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert layer_tensor(merged, 3) == {}
    # embeddings come from the first slice's model, the rest (final norm, head) from the last's
    embedding = next(name for name in merged if "embed_tokens" in name or "wte" in name)
    final_norm = next(name for name in merged if name in ("model.norm.weight", "transformer.ln_f.weight"))
    assert torch.equal(merged[embedding], first[embedding])
    assert torch.equal(merged[final_norm], second[final_norm])


def test_slerp_gradient_over_depth_goes_from_base_to_model(tiny_family, tmp_path):
    family = tiny_family("llama")
    recipe = {**slerp_recipe(family), "parameters": {"t": [0.0, 1.0]}}
    merged = read_state_dict(merge_cli(tmp_path, recipe))
    base, model = read_state_dict(family.base), read_state_dict(family.fine_tunes[0])
    for layer, source in ((0, base), (1, model)):
        expected, actual = layer_tensor(source, layer), layer_tensor(merged, layer)
        assert actual.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(actual[name].float(), expected[name].float(), rtol=2**-7, atol=1e-6)


# ------------------------------------------------------------------------------ exact arithmetic
def expected_linear(family: Family, weights) -> dict[str, torch.Tensor]:
    states = [read_state_dict(path) for path in family.fine_tunes]
    return {name: sum(w * s[name].float() for w, s in zip(weights, states)) / sum(weights) for name in states[0]}


def expected_task_arithmetic(family: Family, weights, scale) -> dict[str, torch.Tensor]:
    base = read_state_dict(family.base)
    states = [read_state_dict(path) for path in family.fine_tunes]
    return {
        name: base[name].float()
        + scale * sum(w * (s[name].float() - base[name].float()) for w, s in zip(weights, states))
        for name in base
    }


def task_arithmetic_recipe(family: Family, weights, scale, dtype) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(family.base),
        "dtype": dtype,
        "models": weighted(family.fine_tunes, weights),
        "parameters": {"lambda": scale},
    }


ARITHMETIC_CASES = {
    "linear": (
        lambda f, dtype: linear_recipe(f, (0.6, 0.3, 0.3), dtype),
        lambda f: expected_linear(f, (0.6, 0.3, 0.3)),
    ),
    "task_arithmetic": (
        lambda f, dtype: task_arithmetic_recipe(f, (0.5, -0.3, 0.8), 0.8, dtype),
        lambda f: expected_task_arithmetic(f, (0.5, -0.3, 0.8), 0.8),
    ),
}
# Relative to each element and, for results that cancel to near zero, to the tensor's typical size
# (rounding errors scale with the operands, not with the result): a couple of ulps of the dtype.
UNIT_ROUNDOFF = {"bfloat16": 2**-8, "float32": 2**-23}


@pytest.mark.parametrize("dtype", sorted(UNIT_ROUNDOFF))
@pytest.mark.parametrize("input_shards", [None, "100KB"], ids=["single-file", "sharded-input"])
@pytest.mark.parametrize("method", sorted(ARITHMETIC_CASES))
def test_result_equals_a_direct_float32_computation(method, input_shards, dtype, tiny_family, tmp_path):
    options = {"shard_size": input_shards} if input_shards else {}
    family = tiny_family("llama", **options)
    if input_shards:
        assert (family.base / "model.safetensors.index.json").is_file()
    recipe, expected = ARITHMETIC_CASES[method]
    merged = read_state_dict(merge_cli(tmp_path, recipe(family, dtype)))
    reference = expected(family)
    assert merged.keys() == reference.keys()
    for name in reference:
        assert merged[name].dtype == getattr(torch, dtype)
        ulp = UNIT_ROUNDOFF[dtype]
        torch.testing.assert_close(
            merged[name].float(),
            reference[name],
            rtol=2 * ulp,
            atol=4 * ulp * reference[name].abs().mean().item(),
            msg=lambda detail, name=name: f"{name}: {detail}",
        )


# ---------------------------------------------------------------------------------- sharded output
def test_sharded_output_has_an_index_and_the_same_tensors(tiny_family, tmp_path):
    family = tiny_family("qwen2")
    whole = merge_cli(tmp_path, ties_recipe(family), "whole")
    sharded = merge_cli(tmp_path, ties_recipe(family), "sharded", "--shard-size", "100KB")

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (sharded / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert all(
        shard.stat().st_size <= 100_000 + 16_384 or len(load_file(shard)) == 1 for shard in shards
    )  # header slack; a tensor larger than a shard gets its own
    merged, reference = read_state_dict(sharded), read_state_dict(whole)
    assert index["weight_map"].keys() == merged.keys() == reference.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert all(torch.equal(merged[name], reference[name]) for name in reference)
    assert_runs(sharded)


# ------------------------------------------------------------------------------------------- seeds
def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_seed_makes_dare_ties_reproducible(tiny_family, tmp_path):
    family = tiny_family("mistral")
    recipe = dare_ties_recipe(family)
    first = merge_cli(tmp_path, recipe, "first", "--seed", "5")
    again = merge_cli(tmp_path, recipe, "again", "--seed", "5")
    other = merge_cli(tmp_path, recipe, "other", "--seed", "6")
    assert digest(first) == digest(again)
    assert digest(first) != digest(other)
    assert yaml.safe_load((first / "mergewise.yml").read_text())["seed"] == 5
    # a random drop really happened: some entries are exactly the base
    base, merged = read_state_dict(family.base), read_state_dict(first)
    name = "model.layers.0.mlp.up_proj.weight"
    assert 0.2 < merged[name].eq(base[name]).float().mean().item() < 0.9


def test_python_api_and_cli_give_the_same_model(tiny_family, tmp_path):
    family = tiny_family("gemma")
    from_cli = merge_cli(tmp_path, dare_ties_recipe(family), "cli", "--seed", "3")
    from_api = mergewise.merge(dare_ties_recipe(family), tmp_path / "api", seed=3, quiet=True)
    assert from_api.out_dir == tmp_path / "api" and Path(from_api) == from_api.out_dir
    assert digest(from_cli) == digest(tmp_path / "api")


@pytest.mark.integration
def test_console_command_exits_with_the_status_after_its_output_is_complete(tiny_family, tmp_path):
    """`python -m mergewise.cli` ends without interpreter teardown: its output must still be flushed
    and complete, and its status that of the command."""
    family = tiny_family("llama")
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump(ties_recipe(family)))
    command = [sys.executable, "-m", "mergewise.cli", "merge", str(config)]
    done = subprocess.run([*command, str(tmp_path / "cli")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"merged model written to {tmp_path / 'cli'}"
    in_process = mergewise.merge(ties_recipe(family), tmp_path / "api", quiet=True)
    assert digest(tmp_path / "cli") == digest(in_process.out_dir)
    refused = subprocess.run([*command, str(tmp_path / "cli")], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: output folder")


@pytest.mark.integration
@pytest.mark.parametrize("preset, expected", [(None, ["10000", "1"]), ("123", ["123", "123"])])
def test_the_command_tunes_its_process_before_torch_loads_unless_told_otherwise(preset, expected):
    script = (
        "import gc, os, sys; from mergewise.cli import _tune_process; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules; _tune_process(); "
        "print(os.environ['GOMP_SPINCOUNT'], os.environ['OPENBLAS_NUM_THREADS'], gc.get_freeze_count() > 10**5)"
    )
    tuned = ("GOMP_SPINCOUNT", "OPENBLAS_NUM_THREADS")
    environment = {key: value for key, value in os.environ.items() if key not in tuned}
    if preset is not None:
        environment.update(dict.fromkeys(tuned, preset))
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [*expected, "True"]


@pytest.mark.parametrize(
    "command, keeps",
    [(["merge", "missing.yml", "out"], True), (["generate", "missing-model", "--prompt", "hi"], False)],
)
def test_only_streaming_commands_keep_freed_buffers_in_the_heap(command, keeps, tmp_path, monkeypatch):
    import mergewise.cli as cli

    kept = []
    monkeypatch.setattr(cli, "_keep_freed_buffers", lambda: kept.append(True))
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2  # nothing there: one clear error, after the process was tuned
    assert kept == ([True] if keeps else [])


def test_relative_model_paths_are_read_from_the_recipe_folder(tiny_family, tmp_path, monkeypatch):
    family = tiny_family("llama")
    absolute = merge_cli(tmp_path, linear_recipe(family), "absolute")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    relative = linear_recipe(family)
    for entry in relative["models"]:
        entry["model"] = os.path.relpath(entry["model"], recipes)
    assert not Path(relative["models"][0]["model"]).is_absolute()
    monkeypatch.chdir(tmp_path / "absolute")  # anywhere but the recipe's folder
    (recipes / "relative.yml").write_text(yaml.safe_dump(relative))
    assert main(["merge", str(recipes / "relative.yml"), str(tmp_path / "relative"), "--quiet"]) == 0
    assert digest(tmp_path / "relative") == digest(absolute)


def test_mapped_rows_equal_read_rows_and_writes_to_them_never_reach_the_file(tiny_family):
    from mergewise.checkpoint import ModelFolder

    model = ModelFolder(tiny_family("llama").base)
    name = "model.embed_tokens.weight"
    file_bytes = model.tensors[name].file.read_bytes()
    mapped = model.map_rows(name, slice(3, 9))
    assert torch.equal(mapped, model.read(name, slice(3, 9)))
    assert torch.equal(model.map_rows(name), model.read(name))
    mapped.fill_(7.0)  # a private mapping: the page is copied, the input model is untouched
    assert model.tensors[name].file.read_bytes() == file_bytes
    assert not torch.equal(model.read(name, slice(3, 9)), mapped)
    model.close()


def test_a_failed_write_leaves_no_output(tiny_family, tmp_path, monkeypatch):
    """Row chunks are written on a background thread: its failure (here a full disk) still stops the
    merge, and the staged output is removed."""
    from mergewise.checkpoint import writer

    calls = {"count": 0}
    original = writer.StreamingShardWriter.write

    def failing_write(self, *args):
        calls["count"] += 1
        if calls["count"] == 5:
            raise OSError(28, "No space left on device")
        return original(self, *args)

    monkeypatch.setattr(writer.StreamingShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        mergewise.merge(ties_recipe(tiny_family("llama")), tmp_path / "out", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_a_scalar_tensor_is_merged_like_any_other(tiny_family, tmp_path):
    """A 0-d tensor (a learned temperature, say) is one row chunk without rows."""
    from safetensors.torch import load_file, save_file

    family = tiny_family("llama")
    models = []
    for index, source in enumerate(family.fine_tunes[:2]):
        folder = Path(shutil.copytree(source, tmp_path / f"m{index}"))
        tensors = load_file(folder / "model.safetensors")
        tensors["logit_scale"] = torch.tensor(2.0 + 2 * index)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        models.append({"model": str(folder), "parameters": {"weight": 0.5}})
    mergewise.merge({"merge_method": "linear", "models": models}, tmp_path / "out", quiet=True)
    assert load_file(tmp_path / "out" / "model.safetensors")["logit_scale"].item() == 3.0


def test_the_output_has_a_model_card_unless_asked_not_to(tiny_family, tmp_path):
    family = tiny_family("llama")
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump(ties_recipe(family)))
    assert main(["merge", str(config), str(tmp_path / "carded"), "--quiet"]) == 0
    card = (tmp_path / "carded" / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert front_matter["library_name"] == "transformers" and "merge" in front_matter["tags"]
    assert str(family.base) in front_matter["base_model"] and card.startswith("---\n")
    assert "# carded" in card and "merge_method: ties" in card
    assert main(["merge", str(config), str(tmp_path / "bare"), "--quiet", "--no-model-card"]) == 0
    assert not (tmp_path / "bare" / "README.md").exists()


@pytest.mark.parametrize("limit", [1, 10, 10**9])
def test_statistics_are_asked_for_ahead_in_order_once_each(limit):
    """While a tensor merges, the statistics of the tensors after it are gathered, up to the limit's
    parameters (at least the next tensor's); every job comes out once, in order, with its own."""
    from types import SimpleNamespace

    from mergewise import engine

    jobs = [SimpleNamespace(name=f"t{index}", shape=(size,)) for index, size in enumerate([8, 1, 1, 4, 2, 8, 1])]
    asked: list[str] = []
    seen = []
    for job, statistics in engine._prepared_ahead(
        jobs, lambda job: asked.append(job.name) or f"stats {job.name}", limit
    ):
        seen.append(job.name)
        assert statistics == f"stats {job.name}"
        ahead = asked[len(seen) :]
        remaining = [other.name for other in jobs[len(seen) :]]
        queued = sum(job.shape[0] for job in jobs if job.name in ahead)
        assert ahead == remaining[: len(ahead)]  # in order, nothing skipped
        assert queued >= min(limit, sum(other.shape[0] for other in jobs[len(seen) :]))
        assert not ahead or queued - jobs[len(seen) + len(ahead) - 1].shape[0] < limit  # no further than needed
    assert seen == asked == [job.name for job in jobs]


@pytest.mark.parametrize(
    "method, parameters",
    [
        ("dare_ties", {"weight": [0.6, 0.4], "density": 0.5}),  # random masks, drawn per row chunk
        ("ties", {"weight": 0.5, "density": 0.3}),  # a whole-tensor `prepare` pass
        ("nuslerp", {"weight": [0.3, 0.7]}),  # no base
    ],
)
def test_merge_tensors_is_what_a_merge_writes_for_one_tensor(tiny_family, tmp_path, method, parameters):
    from mergewise.methods import merge_tensors

    family = tiny_family("llama")
    fine_tunes = family.fine_tunes[:2]
    takes_base = method != "nuslerp"
    models = [
        {
            "model": str(path),
            "parameters": {
                name: value[index] if isinstance(value, list) else value for name, value in parameters.items()
            },
        }
        for index, path in enumerate(fine_tunes)
    ]
    recipe = {
        "merge_method": method,
        "dtype": "float32",
        "models": models,
        **({"base_model": str(family.base)} if takes_base else {}),
    }
    mergewise.merge(recipe, tmp_path / "out", quiet=True, seed=7, chunk_elements=64)
    written, base = read_state_dict(tmp_path / "out"), read_state_dict(family.base)
    inputs = [read_state_dict(path) for path in fine_tunes]
    for name in ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]:
        merged = merge_tensors(
            method,
            base[name].float() if takes_base else None,
            [state[name].float() for state in inputs],
            seed=7,
            tensor=name,
            chunk_elements=64,
            **parameters,
        )
        assert torch.equal(merged, written[name]), name
