"""Every bad input is refused through the CLI the same way: exit status 2, one `error: …` line on
stderr naming the file, tensor or key at fault, no traceback, and nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergewise.checkpoint import StreamingShardWriter
from mergewise.cli import main
from mergewise.errors import RecipeWarning
from tests.support.tiny_models import Family, build_lora_adapter, build_tiny_model, read_state_dict


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def family(tiny_family) -> Family:
    return tiny_family("llama")


def linear_recipe(*models: Path, **extra) -> dict:
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": str(path), "parameters": {"weight": 1.0}} for path in models],
        **extra,
    }


def write_recipe(folder: Path, recipe: dict | str, name: str = "recipe.yml") -> Path:
    path = folder / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def merge(config: Path, out_dir: Path, *flags: str) -> int:
    return main(["merge", str(config), str(out_dir), "--quiet", *flags])


def copy_model(source: Path, destination: Path) -> Path:
    return Path(shutil.copytree(source, destination))


def staging_leftovers(out_dir: Path) -> list[Path]:
    return sorted(out_dir.parent.glob(f".{out_dir.name}.*"))


def assert_refused(capsys, status: int, out_dir: Path, *named: str, out_dir_before: dict | None = None) -> str:
    """The single error line (returned); the output folder neither created nor half-built, or, when
    it existed (`out_dir_before`, its digest), left exactly as it was."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("warning: ")]
    assert status == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in captured.err + captured.out
    for fragment in named:
        assert fragment in lines[0], f"{fragment!r} not named in {lines[0]!r}"
    if out_dir_before is None:
        assert not out_dir.exists()
    else:
        assert folder_digest(out_dir) == out_dir_before
    assert staging_leftovers(out_dir) == []
    return lines[0]


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------------------------- recipe problems
def test_missing_config_file(tmp_path, capsys):
    status = merge(tmp_path / "absent.yml", tmp_path / "out")
    assert_refused(capsys, status, tmp_path / "out", "config file not found", "absent.yml")


def test_invalid_yaml_names_the_file_and_line(tmp_path, capsys):
    config = write_recipe(tmp_path, "merge_method: linear\nmodels: [\n  - model: a\n  bad: : :\n", "bad.yml")
    line = assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", "bad.yml", "invalid YAML")
    assert "line " in line


# Each case edits a valid linear recipe over the base and one fine-tune; `named` must appear in the error.
RECIPE_CASES = {
    "unknown method": (lambda r: {**r, "merge_method": "tie"}, ["unknown merge_method", "'tie'"]),
    "misspelled required parameter": (
        lambda r: {**r, "models": [{**r["models"][0], "parameters": {"wieght": 1.0}}, r["models"][1]]},
        ["missing required parameter weight", "models[0].parameters.wieght looks like a misspelling"],
    ),
    "missing required parameter": (
        lambda r: {**r, "models": [{"model": m["model"]} for m in r["models"]]},
        ["missing required parameter weight"],
    ),
    "parameter of the wrong type": (
        lambda r: {**r, "parameters": {"normalize": "maybe"}},
        ["parameter normalize", "true/false"],
    ),
    "both models and slices": (
        lambda r: {**r, "slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}]}]},
        ["exactly one of 'models', 'slices' or 'modules'"],
    ),
    "unknown dtype": (lambda r: {**r, "dtype": "float8"}, ["dtype", "float8"]),
    "base model required": (lambda r: {**r, "merge_method": "ties"}, ["ties needs base_model"]),
    "too few models for model_stock": (
        lambda r: {
            **r,
            "merge_method": "model_stock",
            "base_model": r["models"][0]["model"],
            "models": [{"model": m["model"]} for m in r["models"]],
        },
        ["model_stock takes at least 2", "got 1"],
    ),
    "model folder not found": (
        lambda r: {**r, "models": [r["models"][0], {"model": "/nonexistent/ft9"}]},
        ["models[1].model", "model folder not found", "/nonexistent/ft9"],
    ),
    "layer range beyond the model": (
        lambda r: {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": r["models"][0]["model"], "layer_range": [0, 5]}]}],
        },
        ["slices[0]", "layer_range [0, 5]", "2 layers"],
    ),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_is_refused_naming_the_key(case, family, tmp_path, capsys):
    edit, named = RECIPE_CASES[case]
    config = write_recipe(tmp_path, edit(linear_recipe(family.base, family.fine_tunes[0])))
    assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", *named)


# Keys and parameters mergekit ignores: a merge warns (naming the key, and the known key it resembles),
# --strict refuses.
TOLERATED_CASES = {
    "unknown top-level key": (lambda r: {**r, "merge_methd": "ties"}, ["merge_methd", "did you mean merge_method?"]),
    "parameter written at the top level": (
        lambda r: {**r, "normalize": False},
        ["normalize", "put it under parameters:"],
    ),
    "unknown shared parameter": (
        lambda r: {**r, "parameters": {"density": 0.5}},
        ["parameters.density", "unknown parameter for merge_method linear"],
    ),
    "unknown key beside a model": (
        lambda r: {**r, "models": [{**r["models"][0], "layer_range": [0, 2]}, r["models"][1]]},
        ["models[0].layer_range", "slices: sources only"],
    ),
    "unknown tokenizer key": (
        lambda r: {**r, "tokenizer": {"sorce": "base"}},
        ["tokenizer.sorce", "did you mean source?"],
    ),
}


@pytest.mark.parametrize("case", sorted(TOLERATED_CASES))
def test_keys_mergekit_ignores_are_named_and_refused_under_strict(case, family, tmp_path, capsys):
    edit, named = TOLERATED_CASES[case]
    config = write_recipe(tmp_path, edit(linear_recipe(family.base, family.fine_tunes[0])))

    with pytest.warns(RecipeWarning) as warned:
        assert merge(config, tmp_path / "out") == 0
    messages = [str(warning.message) for warning in warned if warning.category is RecipeWarning]
    assert len(messages) == 1 and all(fragment in messages[0] for fragment in named), messages
    assert_refused(
        capsys, merge(config, tmp_path / "strict", "--strict"), tmp_path / "strict", *named, "refused: --strict"
    )


@pytest.mark.parametrize(
    "flags, named", [(["--device", "cuda"], ["cuda"]), (["--shard-size", "lots"], ["shard size", "lots"])]
)
def test_bad_option_is_refused(flags, named, family, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = write_recipe(tmp_path, linear_recipe(family.base, family.fine_tunes[0]))
    assert_refused(capsys, merge(config, tmp_path / "out", *flags), tmp_path / "out", *named)


# ----------------------------------------------------------------------------------- broken models
def drop_config(model: Path) -> Path:
    (model / "config.json").unlink()
    return model / "config.json"


def garbage_header(model: Path) -> Path:
    """Keep a plausible declared length, but fill the header with bytes that are not JSON."""
    file = model / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:72] = bytes(range(200, 255)) + b"\x00" * 9
    file.write_bytes(bytes(data))
    return file


def absurd_header_length(model: Path) -> Path:
    file = model / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = b"\xde\xad\xbe\xef\xde\xad\xbe\xef"
    file.write_bytes(bytes(data))
    return file


def truncate(model: Path) -> Path:
    file = model / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return file


def drop_norm(model: Path) -> Path:
    file = model / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    return Path("model.norm.weight")


def no_weights(model: Path) -> Path:
    (model / "model.safetensors").unlink()
    return model


BREAKAGES = {
    "missing config.json": (drop_config, ["missing"]),
    "corrupt safetensors header": (garbage_header, ["corrupt safetensors header"]),
    "absurd safetensors header length": (absurd_header_length, ["corrupt safetensors header"]),
    "truncated safetensors": (truncate, ["truncated"]),
    "tensor missing": (drop_norm, ["missing in"]),
    "no weights at all": (no_weights, ["no *.safetensors"]),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_broken_second_model_is_refused_naming_the_file_or_tensor(case, family, tmp_path, capsys):
    breakage, named = BREAKAGES[case]
    broken = copy_model(family.fine_tunes[0], tmp_path / "broken")
    culprit = breakage(broken)
    config = write_recipe(tmp_path, linear_recipe(family.base, broken))
    assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", str(culprit), *named)


def test_tensor_missing_in_the_first_model_is_refused_too(family, tmp_path, capsys):
    broken = copy_model(family.fine_tunes[0], tmp_path / "broken")
    drop_norm(broken)
    config = write_recipe(tmp_path, linear_recipe(broken, family.base))
    assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", "model.norm.weight", "missing")


def test_different_vocabulary_is_a_shape_mismatch_naming_the_embedding(family, tmp_path, capsys):
    wider = build_tiny_model("llama", tmp_path / "wider", vocab_size=320)
    capsys.readouterr()  # transformers' save progress bar
    config = write_recipe(tmp_path, linear_recipe(family.base, wider))
    assert_refused(
        capsys,
        merge(config, tmp_path / "out"),
        tmp_path / "out",
        "shape mismatch",
        "[320, 64]",
        str(wider),
        "vocabulary sizes differ",
    )


# ------------------------------------------------------------------- what a downloaded folder may hold
def passthrough_recipe(model: Path, layer_range: list[int]) -> dict:
    return {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(model), "layer_range": layer_range}]}]}


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))


CONFIG_BREAKAGES = {  # config.json change, layer range of a passthrough slice, what the error names
    "text_config a string": ({"text_config": "llama"}, [0, 2], "text_config: Input should be a valid dictionary"),
    "layer_types shorter than the layers": (
        {"layer_types": ["full_attention"]},
        [0, 2],
        "layer_types lists 1 layers, but the model has 2",
    ),
    "more layers declared than held": ({"num_hidden_layers": 3}, [0, 3], "declares 3 decoder layers"),
    "a billion layers declared": ({"num_hidden_layers": 10**9}, [4, 10**9], "declares 1000000000 decoder layers"),
    "an integer of 5000 digits": ({"max_position_embeddings": "DIGITS"}, [0, 2], "an integer of 5000 digits"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_BREAKAGES))
def test_a_broken_config_json_is_refused_before_the_merge(case, family, tmp_path, capsys, monkeypatch):
    changes, layer_range, named = CONFIG_BREAKAGES[case]
    model = copy_model(family.fine_tunes[0], tmp_path / "downloaded")
    edit_config(model, **changes)
    config_path = model / "config.json"
    config_path.write_text(config_path.read_text().replace('"DIGITS"', "7" * 5000))
    monkeypatch.setattr(StreamingShardWriter, "write", refuse_writes)
    config = write_recipe(tmp_path, passthrough_recipe(model, layer_range))
    assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", str(config_path), named)


def refuse_writes(*args, **kwargs):
    raise AssertionError("a tensor was merged before the bad input was refused")


INDEX_BREAKAGES = {
    "nested 20 000 deep": ("[" * 20_000 + "]" * 20_000, "nested more than 64 levels deep"),
    "binary": (bytes(range(256)), "not UTF-8 text"),
    "a list for a shard": ({"weight_map": {"model.norm.weight": ["a.safetensors"]}}, "Input should be a valid string"),
    "an integer for a shard": ({"weight_map": {"model.norm.weight": 7}}, "Input should be a valid string"),
    "no weight_map": ({"metadata": {}}, "weight_map: Field required"),
    "a name holding a line break and an escape": (
        {"weight_map": {"model.norm\n\x1b[2J": 7}},
        "weight_map.model.norm\\n\\x1b[2J: Input should be a valid string",
    ),
}


@pytest.mark.parametrize("case", sorted(INDEX_BREAKAGES))
def test_a_broken_weight_index_is_one_error_naming_it(case, tiny_family, tmp_path, capsys):
    content, named = INDEX_BREAKAGES[case]
    sharded = tiny_family("llama", shard_size="100KB")
    capsys.readouterr()  # the models' build
    model = copy_model(sharded.fine_tunes[0], tmp_path / "downloaded")
    index = model / "model.safetensors.index.json"
    index.write_bytes(
        content
        if isinstance(content, bytes)
        else content.encode()
        if isinstance(content, str)
        else json.dumps(content).encode()
    )
    config = write_recipe(tmp_path, linear_recipe(sharded.base, model))
    assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", str(index), named)


def test_a_dimension_no_tensor_can_have_is_refused_from_the_header(tmp_path, capsys):
    """A tensor of no bytes whose shape holds 2**64: its header adds up, but torch cannot make it."""
    model = tmp_path / "downloaded"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    header = {
        "model.layers.0.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "model.norm.weight": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [8, 8]},
    }
    encoded = json.dumps(header).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(8))
    config = write_recipe(tmp_path, linear_recipe(model))
    assert_refused(
        capsys,
        merge(config, tmp_path / "out"),
        tmp_path / "out",
        "model.safetensors",
        "tensor model.norm.weight has shape [0, 18446744073709551616]",
    )


def test_a_recipe_nested_20000_deep_is_one_error_line(tmp_path, capsys):
    config = write_recipe(tmp_path, "merge_method: linear\nmodels: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert_refused(
        capsys,
        merge(config, tmp_path / "out"),
        tmp_path / "out",
        "recipe.yml",
        "invalid YAML",
        "nested more than 64 levels deep",
    )


def test_an_unreadable_progress_record_is_one_error_line(family, tmp_path, capsys):
    """`--resume` reads the journal of a killed merge's staging folder with the same reader: a seed of
    Infinity is refused there, not turned into a traceback."""
    config = write_recipe(tmp_path, linear_recipe(family.base, family.fine_tunes[0]))
    staged = tmp_path / ".out.partial-999999999-killed"
    staged.mkdir()
    (staged / ".mergewise-progress.json").write_text('{"fingerprint": "x", "seed": Infinity, "finished": {}}')
    status = merge(config, tmp_path / "out", "--resume")
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and ".mergewise-progress.json" in lines[0] and "Infinity" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_lora_adapter_is_an_input_no_output_may_touch(family, tmp_path, capsys):
    """An adapter folder is read like the models: `--overwrite` into it (a merge output holding an
    adapter) or an output inside it is refused, and the adapter is left as it was."""
    adapter = tmp_path / "old-out"
    build_lora_adapter(family.base, adapter)
    (adapter / "mergewise.yml").write_text("recipe: {}\n")
    before = folder_digest(adapter)
    capsys.readouterr()
    recipe = {
        "merge_method": "linear",
        "models": [{"model": f"{family.base}+{adapter}", "parameters": {"weight": 1.0}}],
    }
    config = write_recipe(tmp_path, recipe)
    assert_refused(
        capsys,
        merge(config, adapter, "--overwrite"),
        adapter,
        "is inside input model",
        str(adapter),
        out_dir_before=before,
    )
    assert_refused(capsys, merge(config, adapter / "merged"), adapter / "merged", "is inside input model", str(adapter))
    assert folder_digest(adapter) == before


# ---------------------------------------------------------------------------------------- pickles
@pytest.fixture
def pickled_fine_tune(family, tmp_path) -> Path:
    """A copy of fine-tune 1 with its weights as a pytorch_model.bin state dict instead."""
    model = copy_model(family.fine_tunes[0], tmp_path / "pickled")
    torch.save(read_state_dict(model), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return model


def test_pickle_checkpoint_needs_allow_pickle(family, pickled_fine_tune, tmp_path, capsys):
    config = write_recipe(tmp_path, linear_recipe(family.base, pickled_fine_tune))
    line = assert_refused(
        capsys,
        merge(config, tmp_path / "out"),
        tmp_path / "out",
        str(pickled_fine_tune),
        "pytorch_model.bin",
        "--allow-pickle",
    )
    assert "arbitrary code" in line


def test_pickle_checkpoint_merges_like_its_safetensors_twin_with_allow_pickle(
    family, pickled_fine_tune, tmp_path, capsys
):
    pickled = write_recipe(tmp_path, linear_recipe(family.base, pickled_fine_tune), "pickled.yml")
    original = write_recipe(tmp_path, linear_recipe(family.base, family.fine_tunes[0]), "original.yml")
    assert merge(pickled, tmp_path / "from_pickle", "--allow-pickle") == 0
    assert merge(original, tmp_path / "from_safetensors") == 0
    merged, expected = read_state_dict(tmp_path / "from_pickle"), read_state_dict(tmp_path / "from_safetensors")
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


# ------------------------------------------------------------------------------------ output folder
def existing_output(out_dir: Path) -> dict[str, str]:
    """An earlier mergewise output (the only kind of folder --overwrite may replace, besides an empty one)."""
    out_dir.mkdir(parents=True)
    (out_dir / "notes.txt").write_text("precious")
    (out_dir / "mergewise.yml").write_text("recipe: {}\n")
    return folder_digest(out_dir)


def test_existing_output_folder_is_kept_without_overwrite(family, tmp_path, capsys):
    before = existing_output(tmp_path / "out")
    config = write_recipe(tmp_path, linear_recipe(family.base, family.fine_tunes[0]))
    assert_refused(
        capsys,
        merge(config, tmp_path / "out"),
        tmp_path / "out",
        str(tmp_path / "out"),
        "already exists",
        "--overwrite",
        out_dir_before=before,
    )


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "overwritten-folder"])
def test_failure_in_the_middle_of_a_merge_leaves_the_output_as_it_was(existing, family, tmp_path, capsys):
    """della's density ± epsilon is only checked on tensor data, after the output is staged."""
    before = existing_output(tmp_path / "out") if existing else None
    recipe = {
        "merge_method": "della",
        "base_model": str(family.base),
        "models": [
            {"model": str(path), "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.5}}
            for path in family.fine_tunes
        ],
    }
    status = merge(write_recipe(tmp_path, recipe), tmp_path / "out", "--overwrite")
    assert_refused(capsys, status, tmp_path / "out", "tensor ", "epsilon", out_dir_before=before)


def test_overwrite_replaces_an_earlier_output(family, tmp_path, capsys):
    out_dir = tmp_path / "out"
    existing_output(out_dir)
    config = write_recipe(tmp_path, linear_recipe(family.base, family.fine_tunes[0]))
    assert merge(config, out_dir, "--overwrite") == 0
    assert not (out_dir / "notes.txt").exists()
    assert {"config.json", "model.safetensors", "mergewise.yml"} <= set(folder_digest(out_dir))
    assert staging_leftovers(out_dir) == []


def test_overwrite_never_deletes_a_folder_mergewise_did_not_write(family, tmp_path, capsys, monkeypatch):
    config = write_recipe(tmp_path, linear_recipe(family.base, family.fine_tunes[0]))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    before = folder_digest(foreign)
    assert_refused(
        capsys, merge(config, foreign, "--overwrite"), foreign, "not written by mergewise", out_dir_before=before
    )
    monkeypatch.chdir(foreign)  # the working folder, even one mergewise wrote
    (foreign / "mergewise.yml").write_text("recipe: {}\n")
    before = folder_digest(foreign)
    assert_refused(capsys, merge(config, foreign, "--overwrite"), foreign, "would delete", out_dir_before=before)
    monkeypatch.chdir(family.base.parent)
    (tmp_path / "mergewise.yml").write_text("recipe: {}\n")
    before = folder_digest(tmp_path)
    assert_refused(
        capsys, merge(config, tmp_path, "--overwrite"), tmp_path, "would delete", str(config), out_dir_before=before
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge(config, empty, "--overwrite") == 0


@pytest.mark.parametrize("where, named", [("inside", "is inside input model"), ("around", "contains input model")])
def test_output_folder_inside_or_around_an_input_model_is_refused(where, named, family, tmp_path, capsys):
    model = copy_model(family.fine_tunes[0], tmp_path / "models" / "ft1")
    out_dir = model / "merged" if where == "inside" else tmp_path / "models"
    before = None if where == "inside" else folder_digest(out_dir)
    config = write_recipe(tmp_path, linear_recipe(family.base, model))
    assert_refused(capsys, merge(config, out_dir, "--overwrite"), out_dir, named, str(model), out_dir_before=before)
    assert not (model / "merged").exists()


def test_a_merge_never_modifies_its_input_models(family, tmp_path, capsys):
    inputs = [family.base, *family.fine_tunes]
    before = {path: folder_digest(path) for path in inputs}
    recipe = {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [{"model": str(path), "parameters": {"weight": 1.0, "density": 0.5}} for path in family.fine_tunes],
    }
    assert merge(write_recipe(tmp_path, recipe), tmp_path / "out") == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert {path: folder_digest(path) for path in inputs} == before


# ------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "parameters, named",
    [
        ({"weight": float("nan")}, "finite number"),
        ({"weight": float("inf")}, "finite number"),
        ({"weight": 1.0, "density": 7}, "share of entries lies in [0, 1]"),
        ({"weight": 1.0, "density": -0.1}, "share of entries lies in [0, 1]"),
    ],
)
def test_non_finite_and_out_of_range_parameters_are_errors(parameters, named, family, tmp_path, capsys):
    recipe = {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [{"model": str(family.fine_tunes[0]), "parameters": parameters}],
    }
    assert_refused(capsys, merge(write_recipe(tmp_path, recipe), tmp_path / "out"), tmp_path / "out", named)


def test_weights_summing_to_zero_are_an_error_not_nan_weights(family, tmp_path, capsys):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(family.fine_tunes[0]), "parameters": {"weight": 1.0}},
            {"model": str(family.fine_tunes[1]), "parameters": {"weight": -1.0}},
        ],
    }
    assert_refused(
        capsys, merge(write_recipe(tmp_path, recipe), tmp_path / "out"), tmp_path / "out", "weights sum to 0"
    )


def test_an_oversized_recipe_is_refused_before_parsing(tmp_path, capsys):
    config = tmp_path / "huge.yml"
    config.write_text("merge_method: linear\nmodels:\n" + "  - model: ./x\n" * 100_000)
    assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", "huge.yml", "is refused")


# --------------------------------------------------------------------------- concurrent merges
def test_one_merge_per_output_folder_at_a_time(family, tmp_path, capsys):
    import fcntl

    config = write_recipe(tmp_path, linear_recipe(family.base, family.fine_tunes[0]))
    with open(tmp_path / ".out.lock", "a") as held:  # what a running merge into `out` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        assert merge(config, tmp_path / "out") == 2
        assert "another mergewise process is writing" in capsys.readouterr().err
        assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.glob(".out.*")] == [".out.lock"]
    assert merge(config, tmp_path / "out") == 0
    assert staging_leftovers(tmp_path / "out") == []  # the lock file goes with the merge that held it


def test_a_folder_that_appears_during_a_merge_is_not_replaced(family, tmp_path, capsys, monkeypatch):
    from mergewise.checkpoint import writer

    config = write_recipe(tmp_path, linear_recipe(family.base, family.fine_tunes[0]))
    out_dir = tmp_path / "out"
    close = writer.StreamingShardWriter.close

    def someone_else_writes_out_dir(self):
        close(self)
        if not out_dir.exists():
            out_dir.mkdir()
            (out_dir / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(writer.StreamingShardWriter, "close", someone_else_writes_out_dir)
    status = merge(config, out_dir)
    theirs = {"theirs.txt": hashlib.sha256(b"theirs").hexdigest()}
    assert_refused(capsys, status, out_dir, "appeared while", out_dir_before=theirs)


def test_nan_in_an_input_is_named_and_an_error_with_strict(family, tmp_path, capsys):
    poisoned = copy_model(family.fine_tunes[1], tmp_path / "poisoned")
    tensors = load_file(poisoned / "model.safetensors")
    name = next(key for key in tensors if key.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    config = write_recipe(tmp_path, linear_recipe(family.fine_tunes[0], poisoned))
    assert_refused(
        capsys,
        merge(config, tmp_path / "strict", "--strict"),
        tmp_path / "strict",
        name,
        str(poisoned),
        "NaN or infinity",
    )
    with pytest.warns(RuntimeWarning, match=f"tensor {name}: .*NaN or infinity in {poisoned}"):
        assert merge(config, tmp_path / "lenient") == 0
