"""Hub ids in recipes resolve through the Hugging Face cache; tests lay the cache out by hand (as
`huggingface_hub` documents it) and never touch the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

import mergewise
from mergewise.checkpoint.hub import HEADER_PREFETCH
from mergewise.cli import main
from tests.support.fake_hub import FakeHub, fake_hub
from tests.support.tiny_models import read_state_dict

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo: str, source: Path) -> Path:
    """`source` stored as the cache stores `repo` at COMMIT: blobs, a snapshot of symlinks, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    blobs, snapshot = root / "blobs", root / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        blob = blobs / f"{file.name}.blob"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(blob)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, tiny_family) -> Path:
    family = tiny_family("llama")
    cache = tmp_path / "hub"
    cache_model(cache, "acme/base", family.base)
    cache_model(cache, "acme/math", family.fine_tunes[0])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_merge_from_a_warm_cache_offline(offline_cache, tiny_family, tmp_path):
    family = tiny_family("llama")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "acme/base",
        "models": [{"model": f"acme/math@{COMMIT}", "parameters": {"weight": 0.5}}],
    }
    local = {
        "merge_method": "task_arithmetic",
        "base_model": str(family.base),
        "models": [{"model": str(family.fine_tunes[0]), "parameters": {"weight": 0.5}}],
    }
    mergewise.merge(recipe, tmp_path / "from-hub", quiet=True)
    mergewise.merge(local, tmp_path / "from-folders", quiet=True)
    hub, folders = read_state_dict(tmp_path / "from-hub"), read_state_dict(tmp_path / "from-folders")
    assert hub.keys() == folders.keys() and all(hub[name].equal(folders[name]) for name in hub)
    resolved = yaml.safe_load((tmp_path / "from-hub" / "mergewise.yml").read_text())["resolved_models"]
    assert resolved["acme/base"].endswith(f"(commit {COMMIT})")
    assert resolved[f"acme/math@{COMMIT}"].endswith(f"(commit {COMMIT})")


def test_a_hub_id_missing_from_the_cache_offline_is_one_error_line(offline_cache, tmp_path, capsys):
    config = tmp_path / "recipe.yml"
    config.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": "acme/missing", "parameters": {"weight": 1.0}}]})
    )
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: models[0].model: acme/missing: not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in error and not (tmp_path / "out").exists()


# ------------------------------------------------------------- planned before the weights download


@pytest.fixture
def online_hub(tmp_path, monkeypatch, tiny_family):
    """A fake Hub at HF_ENDPOINT serving a tiny family (acme/base, acme/math, acme/code; acme/sharded
    a fine-tune in 600 kB shards with an index, acme/other a model of another architecture), with an
    empty cache."""
    from huggingface_hub import constants

    size = {"hidden_size": 128, "intermediate_size": 512}  # megabytes of weights: headers are a small part
    family, sharded = tiny_family("llama", **size), tiny_family("llama", **size, shard_size="600KB")
    repos = {
        "acme/base": family.base,
        "acme/math": family.fine_tunes[0],
        "acme/code": family.fine_tunes[1],
        "acme/sharded": sharded.fine_tunes[0],
        "acme/other": tiny_family("qwen2").fine_tunes[0],
        "acme/vlm": tiny_family("gemma3").fine_tunes[0],
    }
    with fake_hub(repos) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        yield hub


def weight_bytes(folder: Path) -> dict[str, int]:
    return {file.name: file.stat().st_size for file in folder.glob("*.safetensors")}


def assert_only_headers_served(hub: FakeHub) -> None:
    """Of every weight file, at most the first ranged request (the header, and what follows it up to
    HEADER_PREFETCH bytes) left the fake Hub: a small part of the weights."""
    sizes = {(repo, name): size for repo, folder in hub.repos.items() for name, size in weight_bytes(folder).items()}
    for file, size in sizes.items():
        assert hub.served[file] <= min(size, HEADER_PREFETCH), (file, hub.served[file], size)
    assert hub.bytes_served("*.safetensors") < 0.2 * sum(sizes.values())


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


TIES_ON_THE_HUB = {
    "merge_method": "ties",
    "base_model": "acme/base",
    "models": [
        {"model": "acme/math", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "acme/sharded", "parameters": {"weight": 0.4, "density": 0.5}},
    ],
    "dtype": "float32",
}


def test_a_hub_recipe_is_planned_from_headers_then_downloads_and_merges_as_local_folders(online_hub, tmp_path):
    hub = online_hub
    local = {
        **TIES_ON_THE_HUB,
        "base_model": str(hub.repos["acme/base"]),
        "models": [{**entry, "model": str(hub.repos[entry["model"]])} for entry in TIES_ON_THE_HUB["models"]],
    }
    mergewise.merge(TIES_ON_THE_HUB, tmp_path / "from-hub", quiet=True)
    mergewise.merge(local, tmp_path / "from-folders", quiet=True)
    merged, expected = read_state_dict(tmp_path / "from-hub"), read_state_dict(tmp_path / "from-folders")
    assert merged.keys() == expected.keys() and all(merged[name].equal(expected[name]) for name in merged)
    for repo in ("acme/base", "acme/math", "acme/sharded"):  # each weight file whole, once, plus its header
        for name, size in weight_bytes(hub.repos[repo]).items():
            assert size <= hub.served[(repo, name)] <= size + HEADER_PREFETCH, (repo, name)
    assert len(weight_bytes(hub.repos["acme/sharded"])) > 1  # the index's shards were each planned
    before = hub.bytes_served("*.safetensors")
    mergewise.merge(TIES_ON_THE_HUB, tmp_path / "again", quiet=True)  # a warm cache: nothing more to fetch
    assert hub.bytes_served("*.safetensors") == before


@pytest.mark.parametrize(
    "recipe, named",
    [
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "acme/math", "layer_range": [0, 9]}]}]},
            "layer_range",
        ),
        (
            {**TIES_ON_THE_HUB, "models": [{"model": "acme/other", "parameters": {"weight": 1.0, "density": 0.5}}]},
            "models--acme--other",
        ),
        (
            {
                **TIES_ON_THE_HUB,
                "models": [{"model": "acme/math", "parameters": {"weight": [{"filter": "self_atn", "value": 1.0}]}}],
            },
            "missing required parameter weight for acme/math:",
        ),
        (
            {"merge_method": "linear", "modules": {"vision": {"models": [{"model": "acme/vlm"}]}}},
            "modules.vision: acme/vlm (gemma3) has no module vision; its modules are multi_modal_projector, "
            "text_decoder, vision_tower",
        ),
    ],
    ids=[
        "layer-range-past-the-depth",
        "another-architecture",
        "a-weight-only-for-a-misspelled-filter",
        "a-module-the-model-lacks",
    ],
)
def test_a_hub_recipe_that_cannot_work_fails_having_fetched_only_headers(online_hub, tmp_path, capsys, recipe, named):
    status = main(["merge", str(write_recipe(tmp_path / "recipe.yml", recipe)), str(tmp_path / "out"), "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and error[-1].startswith("error: ") and named in error[-1], error
    assert_only_headers_served(online_hub)
    assert not (tmp_path / "out").exists()


def test_dry_run_of_a_hub_recipe_lists_its_plan_reading_only_headers(online_hub, tmp_path, capsys):
    hub = online_hub
    assert main(["merge", "--dry-run", str(write_recipe(tmp_path / "recipe.yml", TIES_ON_THE_HUB))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ties of 2 model(s) onto base acme/base" in out[0]
    to_download = sum(
        sum(weight_bytes(hub.repos[repo]).values()) for repo in ("acme/base", "acme/math", "acme/sharded")
    )
    assert "to download from the Hub first: acme/base, acme/math, acme/sharded" in out[1]
    assert f"({to_download / 1e6:.1f} MB to download" in out[1]
    assert out[2].startswith("  peak memory about ") and "for ties's working memory" in out[2]
    listed = {line.split()[0]: line for line in out[3:]}
    assert listed.keys() == read_state_dict(hub.repos["acme/base"]).keys()
    assert listed["model.layers.0.mlp.up_proj.weight"].endswith("<- acme/math, acme/sharded; base acme/base")
    assert_only_headers_served(hub)


def test_a_local_recipe_dry_run_reads_no_weight_data(tiny_family, tmp_path, capsys, monkeypatch):
    """--dry-run and --check open no weight file for reading beyond its header."""
    from mergewise.checkpoint import reader

    family = tiny_family("llama")
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(model), "parameters": {"weight": 0.5}} for model in family.fine_tunes[:2]],
    }

    def no_data(*args, **kwargs):
        raise AssertionError("weight data read")

    monkeypatch.setattr(reader, "read_rows", no_data)
    monkeypatch.setattr(reader, "map_rows", no_data)
    assert main(["merge", "--dry-run", str(write_recipe(tmp_path / "recipe.yml", recipe))]) == 0
    out = capsys.readouterr().out.splitlines()
    size = sum(weight_bytes(family.fine_tunes[0]).values())
    assert out[1].startswith("  reads ") and ", writes " in out[1] and "Hub" not in out[1]
    assert out[2].startswith("  peak memory about ") and "73.4 MB for linear's working memory" in out[2]
    assert len(out) == 3 + len(read_state_dict(family.base)), size


def test_an_unknown_hub_id_is_one_error_line_and_a_warm_cache_merges_with_the_hub_unreachable(
    online_hub, tmp_path, capsys, monkeypatch
):
    from huggingface_hub import constants

    recipe = write_recipe(tmp_path / "missing.yml", {**TIES_ON_THE_HUB, "base_model": "acme/missing"})
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: base_model: acme/missing: no such model on the Hugging Face Hub"), error
    mergewise.merge(TIES_ON_THE_HUB, tmp_path / "online", quiet=True)  # warms the cache
    closed = "http://127.0.0.1:9"  # the discard port: nothing answers
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    mergewise.merge(TIES_ON_THE_HUB, tmp_path / "unreachable", quiet=True)
    online, unreachable = read_state_dict(tmp_path / "online"), read_state_dict(tmp_path / "unreachable")
    assert online.keys() == unreachable.keys() and all(online[name].equal(unreachable[name]) for name in online)


MOE_ON_THE_HUB = {
    "base_model": "acme/base",
    "experts": [
        {"source_model": "acme/math", "positive_prompts": ["one two three", "count to four"]},
        {"source_model": "acme/code", "positive_prompts": ["the cat sat", "a dog ran"]},
    ],
}


def test_a_hub_moe_recipe_is_planned_from_headers_and_fails_or_lists_before_any_weight_download(
    online_hub, tmp_path, capsys
):
    recipe = write_recipe(tmp_path / "moe.yml", MOE_ON_THE_HUB)
    assert main(["moe", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "output architecture: Mixtral; 2 experts" in capsys.readouterr().out
    assert_only_headers_served(online_hub)
    online_hub.served.clear()  # each planning reads the headers again
    wrong = write_recipe(tmp_path / "wrong.yml", {**MOE_ON_THE_HUB, "architecture": "qwen3"})
    assert main(["moe", str(wrong), str(tmp_path / "out"), "--quiet"]) == 2
    assert "Qwen3 MoE takes qwen3 models, these are llama" in capsys.readouterr().err
    assert_only_headers_served(online_hub)
    assert not (tmp_path / "out").exists()
    assert main(["moe", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    local = {
        **MOE_ON_THE_HUB,
        "base_model": str(online_hub.repos["acme/base"]),
        "experts": [
            {**expert, "source_model": str(online_hub.repos[expert["source_model"]])}
            for expert in MOE_ON_THE_HUB["experts"]
        ],
    }
    assert main(["moe", str(write_recipe(tmp_path / "local.yml", local)), str(tmp_path / "local"), "--quiet"]) == 0
    built, expected = read_state_dict(tmp_path / "out"), read_state_dict(tmp_path / "local")
    assert built.keys() == expected.keys() and all(built[name].equal(expected[name]) for name in built)
