"""Folders that every pytest-xdist worker of one run shares: what takes a minute to build (mergekit's
outputs, the trained tiny zoo) is built by whichever worker asks first, not once per worker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from filelock import FileLock


@contextmanager
def run_wide_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """`name`'s folder in this run's temporary root, held under a lock while the caller fills it or
    finds it filled (the caller decides which, e.g. by a file it writes last)."""
    worker_root = tmp_path_factory.getbasetemp()
    root = worker_root.parent if os.environ.get("PYTEST_XDIST_WORKER") else worker_root
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        folder.mkdir(exist_ok=True)
        yield folder
