"""A tiny Mediator build: three fine-tunes of a tiny Llama, each with prompts of its own words, so
that the router's features tell the tasks apart; tests of the runtime and of serving share it."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tests.support.tiny_models import Family, build_family

# Three prompt styles built from the tiny tokenizer's vocabulary, so their features separate.
TASK_WORDS = {
    "merging": "model merging weights task arithmetic fine tuned language models base".split(),
    "animals": "quick brown fox jumps over lazy dog cat sleeps warm sun".split(),
    "numbers": "one two three four five six seven eight nine ten".split(),
}
HELD_BACK_WORDS = "attention heads share keys values across groups memory generation".split()


def prompts_for(words: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(count)]


def build_mediator_family(root: Path, arch: str = "llama") -> tuple[Path, Family]:
    """The base, one fine-tune per task (float32) and each task's prompts file, under `root`."""
    built = build_family(arch, root, num_fine_tunes=3, noise=0.05, dtype=torch.float32)
    for index, task in enumerate(TASK_WORDS):
        (root / f"{task}.txt").write_text("\n".join(prompts_for(TASK_WORDS[task], 40, index)) + "\n")
    return root, built


def mediator_recipe(root: Path, family: Family, **mediator) -> dict:
    experts = [
        {"model": str(path), "task": task, "prompts": str(root / f"{task}.txt")}
        for path, task in zip(family.fine_tunes, TASK_WORDS)
    ]
    return {
        "merge_method": "linear",
        "base_model": str(family.base),
        "dtype": "float32",
        "mediator": {"experts": experts, **mediator},
    }


def build_tiny_mediator(family: tuple[Path, Family], out: Path, **mediator) -> Path:
    """A Mediator folder of the family's experts at `out` (`mediator` settings as in a recipe)."""
    from mergewise.mediator.build import build

    root, built = family
    build(mediator_recipe(root, built, **mediator), out, quiet=True, seed=0)
    return out


def build_exact_mediator(family: tuple[Path, Family], out: Path) -> Path:
    """Every unit routed, each expert kept whole (sparse at density 1): a selected route is its expert."""
    return build_tiny_mediator(family, out, route_threshold=0.0, code="sparse", density=1.0)
