"""Folders that every pytest-xdist worker of one run shares: what takes a minute to build (mergekit's
outputs, the trained tiny zoo) is built by whichever worker asks first, not once per worker."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from filelock import FileLock, Timeout


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


def fill_in_parts(folder: Path, count: int, fill: Callable[[int], None]) -> None:
    """`fill(part)` once per run for each part 0..count-1 of a shared build: a worker takes the parts
    nobody holds, then waits for the ones others hold, so two workers arriving together split the
    work instead of one waiting for the other."""

    def fill_once(part: int) -> None:
        done = folder / f"part-{part}.done"
        if not done.exists():
            fill(part)
            done.touch()

    locks = [FileLock(str(folder / f"part-{part}.lock")) for part in range(count)]
    held_by_others = []
    for part, lock in enumerate(locks):
        try:
            lock.acquire(timeout=0)
        except Timeout:
            held_by_others.append(part)
            continue
        try:
            fill_once(part)
        finally:
            lock.release()
    for part in held_by_others:  # done by the other worker, unless it failed: then filled here
        with locks[part]:
            fill_once(part)
