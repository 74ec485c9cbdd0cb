"""The output's README.md: a Hugging Face model card saying what was merged, how, and with which
recipe (the Hub reads its front matter: `base_model`, `tags`, `library_name`)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mergewise.checkpoint.writer import write_text
from mergewise.plan import MergePlan


def write_model_card(folder: Path, title: str, plan: MergePlan, recipe_record: dict) -> None:
    models = [str(model) for model in plan.config.model_paths()]
    front_matter = {"base_model": models, "library_name": "transformers", "tags": ["mergewise", "merge"]}
    method = plan.method
    listed = "\n".join(f"- `{model}`" for model in models)
    base = f" with `{plan.config.base_model}` as the base" if plan.config.base_model else ""
    card = (
        f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n\n"
        f"# {title}\n\n"
        f"A merge of pre-trained language models made with mergewise, by `{method.name}` "
        f"({method.description}){base}.\n\n"
        f"## Models merged\n\n{listed}\n\n"
        f"## Recipe\n\n{fenced(yaml.safe_dump(recipe_record, sort_keys=False), 'yaml')}"
    )
    write_text(folder / "README.md", card)


def fenced(text: str, language: str) -> str:
    """`text` as a Markdown code block whose fence is longer than any run of backticks inside it (a
    recipe's chat template may hold a line of three), so nothing in it ends the block."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}{fence}\n"
