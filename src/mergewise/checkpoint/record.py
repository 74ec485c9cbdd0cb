"""mergewise.yml, the record of how a folder was made, and the fingerprint that a resumed merge's
staged folder is checked against."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from mergewise._version import __version__
from mergewise.checkpoint.files import read_yaml
from mergewise.checkpoint.output import RECORD_FILE
from mergewise.checkpoint.reader import revision_of
from mergewise.checkpoint.writer import PlannedTensor, write_text


def merge_fingerprint(recipe: dict, files: list[Path], tensors: list[PlannedTensor], shard_size: int) -> str:
    """What decides a merge's bytes, but the seed: recipe, input files, layout, version."""
    described = {
        "recipe": recipe,
        "files": [(file, os.stat(file).st_size, os.stat(file).st_mtime_ns) for file in sorted({str(f) for f in files})],
        "tensors": [(tensor.name, list(tensor.shape), str(tensor.dtype)) for tensor in tensors],
        "shard_size": shard_size,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def write_merge_record(
    folder: Path, recipe: dict, models: dict[str, Path], seed: int, device: str, records: dict[str, Any]
) -> None:
    """mergewise.yml of a merge: the recipe, where each of its model references was read from, what
    else decides the result, and what each recipe block did."""
    record = {
        "recipe": recipe,
        "resolved_models": {reference: _resolved(path) for reference, path in models.items()},
        "seed": seed,
        "mergewise_version": __version__,
        "torch_version": str(torch.__version__),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        **{name: value for name, value in records.items() if value is not None},
    }
    write_text(folder / RECORD_FILE, yaml.safe_dump(record, sort_keys=False))


def extended_record(source: Path, key: str, record: dict) -> dict:
    """The record of a folder made from `source`: the source's own record, plus `record` under `key`."""
    previous = source / RECORD_FILE
    history = (
        read_yaml(previous, RECORD_FILE, folder=source, schema=dict[str, Any])
        if previous.exists() or previous.is_symlink()
        else {}
    )
    history[key] = {**record, "mergewise_version": __version__}
    return history


def _resolved(folder: Path) -> str:
    """Where a model was read from; for a Hub snapshot, with the commit it holds."""
    revision = revision_of(folder)
    return f"{folder} (commit {revision})" if revision else str(folder)
