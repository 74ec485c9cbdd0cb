"""Shared fixtures: tiny model families are built once per test session and reused by every test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mergewise.zoo import build_zoo
from tests.support.fake_zoo import build_fake_zoo
from tests.support.shared import run_wide_folder
from tests.support.tiny_models import Family, build_family


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's torch gets its share of the cores: two workers of two
    threads each on two cores spin against each other in every parallel op."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> Callable[..., Family]:
    """Return `make(arch, **options) -> Family` (base + 3 fine-tunes), cached per argument set.

    `options` go to `build_family`, e.g. `shard_size="100KB"` for a sharded checkpoint with an index.
    Tests must treat the folders as read-only since other tests share them.
    """
    built: dict[tuple, Family] = {}

    def make(arch: str, **options) -> Family:
        key = (arch, tuple(sorted(options.items())))
        if key not in built:
            built[key] = build_family(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), **options)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The run's tiny zoo (built by whichever test of any worker asks first; a finished zoo is reused)."""
    with run_wide_folder(tmp_path_factory, "tiny-zoo") as zoo_dir:
        build_zoo(zoo_dir, "tiny", seed=0)
    return zoo_dir


@pytest.fixture(scope="session")
def fake_zoo(tmp_path_factory) -> Path:
    """A zoo of untrained models (zoo.json, task files, folders): for tests that need only its paths."""
    return build_fake_zoo(tmp_path_factory.mktemp("fake-zoo"))
