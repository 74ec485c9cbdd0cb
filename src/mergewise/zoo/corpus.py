"""General text every machine with Python has: the standard library's own source files."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from mergewise.zoo.tokenizer import keep_known_characters


def stdlib_sources() -> list[Path]:
    """Top-level stdlib modules, sorted, so the corpus is the same on every run of one Python."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def stdlib_text_split(train_chars: int, eval_chars: int, holdout_every: int = 10) -> tuple[str, str]:
    """Train and held-out text from disjoint files: every `holdout_every`-th file is held out, so the
    general score measures text the models never saw."""
    train_parts: list[str] = []
    eval_parts: list[str] = []
    for index, path in enumerate(stdlib_sources()):
        parts = eval_parts if index % holdout_every == holdout_every - 1 else train_parts
        parts.append(keep_known_characters(path.read_text(encoding="utf-8", errors="replace")))
    return "\n".join(train_parts)[:train_chars], "\n".join(eval_parts)[:eval_chars]
