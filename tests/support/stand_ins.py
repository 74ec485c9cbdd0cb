"""Tiny stand-in checkpoints for the models a published recipe names.

A recipe copied from a model card names 7–70 B models (`mistralai/Mistral-7B-v0.1`, local paths,
`model+adapter` LoRAs, `org/name@revision`). Each name gets a tiny Llama of its own in a work folder,
at the path the recipe gives (relative Hub ids are folders there, which both mergekit and mergewise
read before the Hub), deep enough for every `layer_range` of the recipe. Every stand-in is one shared
random model plus noise seeded by its name, so they are fine-tunes of one another, as a recipe's
models are; an adapter name gets a random PEFT LoRA adapter.
"""

from __future__ import annotations

import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.tiny_models import build_fine_tune, build_lora_adapter, build_tiny_model

ARCHITECTURE = "llama"
SIZE = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2}
MIN_LAYERS = 4
TOKENIZER_WORDS = ("union", "base")
ABSOLUTE = "absolute"  # where the stand-ins of absolute paths live, inside the work folder


@dataclass(frozen=True)
class PreparedRecipe:
    """A recipe placed in its work folder beside the stand-ins of the models it names."""

    source: Path  # the recipe as published
    recipe: Path  # its copy in `folder` (absolute model paths moved under it)
    folder: Path
    merge_method: str


def model_names(recipe: Any) -> tuple[set[str], set[str]]:
    """(models, LoRA adapters) a recipe names, revisions stripped: every `model`, `base_model` and
    model-valued tokenizer source, at any depth."""
    models: set[str] = set()
    adapters: set[str] = set()

    def add(reference: str) -> None:
        model, plus, adapter = reference.partition("+")
        models.add(model.rpartition("@")[0] or model)
        if plus:
            adapters.add(adapter.rpartition("@")[0] or adapter)

    def walk(node: Any, key: str | None = None) -> None:
        if isinstance(node, dict):
            for child_key, child in node.items():
                walk(child, str(child_key))
        elif isinstance(node, list):
            for child in node:
                walk(child, key)
        elif isinstance(node, str) and key in ("model", "base_model", "tokenizer_source", "source"):
            if node not in TOKENIZER_WORDS and not (key == "source" and not _looks_like_model(node)):
                add(node)

    walk(recipe)
    return models, adapters


def _looks_like_model(value: str) -> bool:
    return "/" in value or value.startswith(".")


def layers_needed(recipe: Any) -> int:
    """The depth every stand-in gets: the end of the recipe's deepest `layer_range`."""
    ends = [int(end) for _, end in _layer_ranges(recipe)]
    return max([MIN_LAYERS, *ends])


def _layer_ranges(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "layer_range" and isinstance(value, list) and len(value) == 2:
                yield value
            else:
                yield from _layer_ranges(value)
    elif isinstance(node, list):
        for value in node:
            yield from _layer_ranges(value)


class StandIns:
    """Builds (once per depth and name) and places stand-ins; `root` is a scratch folder."""

    def __init__(self, root: Path):
        self.root = root
        self._bases: dict[int, Path] = {}
        self._built: dict[tuple[int, str, bool], Path] = {}

    def prepare(self, published: Path, folder: Path) -> PreparedRecipe:
        text = published.read_text(encoding="utf-8")
        recipe = yaml.safe_load(text)
        depth = layers_needed(recipe)
        models, adapters = model_names(recipe)
        for name in sorted(models | adapters):
            if Path(name).is_absolute():
                text = text.replace(name, f"{ABSOLUTE}/{name.lstrip('/')}")
        folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(models | adapters):
            target = folder / _relative(name)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(self._stand_in(depth, name, adapter=name in adapters and name not in models), target)
        copy = folder / published.name
        copy.write_text(text, encoding="utf-8")
        return PreparedRecipe(published, copy, folder, str(recipe.get("merge_method")))

    def _stand_in(self, depth: int, name: str, *, adapter: bool) -> Path:
        key = (depth, name, adapter)
        if key not in self._built:
            out = self.root / f"depth-{depth}" / f"{len(self._built):04d}"
            seed = zlib.crc32(name.encode())
            if adapter:
                build_lora_adapter(self._base(depth), out, seed=seed, rank=2)
            else:
                build_fine_tune(self._base(depth), out, seed=seed)
            self._built[key] = out
        return self._built[key]

    def _base(self, depth: int) -> Path:
        if depth not in self._bases:
            self._bases[depth] = build_tiny_model(
                ARCHITECTURE, self.root / f"depth-{depth}" / "root", num_layers=depth, **SIZE
            )
        return self._bases[depth]


def _relative(name: str) -> Path:
    return Path(ABSOLUTE) / name.lstrip("/") if Path(name).is_absolute() else Path(re.sub(r"^(\./)+", "", name))
