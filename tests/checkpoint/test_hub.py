"""Hub ids in recipes resolve through the Hugging Face cache; tests lay the cache out by hand (as
`huggingface_hub` documents it) and never touch the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

import mergewise
from mergewise.cli import main
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
