"""zoo.json: the contract between `mergewise zoo build` and everything that reads a zoo (eval, checks).
docs/zoo.md describes the zoo; paths inside are relative to the zoo folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergewise.checkpoint.files import read_json, read_jsonl
from mergewise.errors import MergewiseError

MANIFEST_NAME = "zoo.json"
KIND_NAMES = {str: "a string", dict: "an object", type(None): "null"}
HELD_OUT_SPLITS = ("validation", "test")


@dataclass(frozen=True)
class ZooTask:
    name: str
    expert: Path | None
    calibration: Path
    eval: Path
    metric: str


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    tasks: dict[str, ZooTask]
    general_eval: Path
    raw: dict

    def eval_examples(self, task: str, split: str | None = None) -> list[dict]:
        """The task's held-out `{"prompt", "answer"}` records; `split` halves them: "validation" (the
        first half, which `mergewise search` scores trials on) or "test" (the rest, never searched)."""
        examples = read_jsonl(self.tasks[task].eval, "evaluation examples", ("prompt", "answer"))
        if split is None:
            return examples
        if split not in HELD_OUT_SPLITS:
            raise ValueError(f"split must be one of {', '.join(HELD_OUT_SPLITS)}, got {split!r}")
        half = (len(examples) + 1) // 2
        return examples[:half] if split == "validation" else examples[half:]


def manifest_path(zoo_dir: str | os.PathLike) -> Path:
    return Path(zoo_dir) / MANIFEST_NAME


def read_manifest_dict(zoo_dir: str | os.PathLike) -> dict | None:
    """The raw zoo.json, or None when the folder has none yet (a build that has not started)."""
    path = manifest_path(zoo_dir)
    if not path.is_file():
        return None
    manifest = read_json(path, "zoo manifest", finite=False)
    if not isinstance(manifest, dict):
        raise MergewiseError(f"{path}: expected a JSON object")
    return manifest


def write_manifest_dict(zoo_dir: str | os.PathLike, manifest: dict) -> None:
    """Write through a temporary file so a crash never leaves a half-written zoo.json."""
    path = manifest_path(zoo_dir)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def load_zoo(zoo_dir: str | os.PathLike) -> Zoo:
    """Parse and check zoo.json; every error names zoo.json and the key at fault."""
    root = Path(zoo_dir)
    manifest = read_manifest_dict(root)
    path = manifest_path(root)
    if manifest is None:
        raise MergewiseError(f"{path}: no zoo here (build one with `mergewise zoo build`)")

    def required(mapping: dict, key: str, where: str, kinds: tuple[type, ...] = (str,)) -> Any:
        if key not in mapping:
            raise MergewiseError(f"{path}: missing key '{where}{key}'")
        if not isinstance(mapping[key], kinds):
            raise MergewiseError(f"{path}: '{where}{key}' must be {' or '.join(KIND_NAMES[kind] for kind in kinds)}")
        return mapping[key]

    tasks_section = required(manifest, "tasks", "", (dict,))
    if not tasks_section:
        raise MergewiseError(f"{path}: 'tasks' must be a non-empty object")
    tasks = {}
    for name, entry in tasks_section.items():
        where = f"tasks.{name}."
        if not isinstance(entry, dict):
            raise MergewiseError(f"{path}: 'tasks.{name}' must be an object")
        expert = required(entry, "expert", where, (str, type(None)))
        tasks[name] = ZooTask(
            name=name,
            expert=None if expert is None else root / expert,
            calibration=root / required(entry, "calibration", where),
            eval=root / required(entry, "eval", where),
            metric=required(entry, "metric", where),
        )
        if tasks[name].metric not in {"exact_match", "nll"}:
            raise MergewiseError(f"{path}: 'tasks.{name}.metric' must be 'exact_match' or 'nll'")
    general = required(manifest, "general", "", (dict,))
    return Zoo(
        root=root,
        base=root / required(manifest, "base", ""),
        tasks=tasks,
        general_eval=root / required(general, "eval", "general."),
        raw=manifest,
    )
