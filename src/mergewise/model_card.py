"""The output's README.md: a Hugging Face model card saying what was merged, how, and with which
recipe (the Hub reads its front matter: `base_model`, `tags`, `library_name`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mergewise.plan import MergePlan


def write_model_card(folder: Path, title: str, plan: MergePlan, recipe_record: dict) -> None:
    models = [str(model) for model in plan.config.model_paths()]
    front_matter = {"base_model": models, "library_name": "transformers", "tags": ["mergewise", "merge"]}
    method = plan.method
    listed = "\n".join(f"- `{model}`" for model in models)
    base = f" with `{plan.config.base_model}` as the base" if plan.config.base_model else ""
    card = (f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n\n"
            f"# {title}\n\n"
            f"A merge of pre-trained language models made with mergewise, by `{method.name}` "
            f"({method.description}){base}.\n\n"
            f"## Models merged\n\n{listed}\n\n"
            f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe_record, sort_keys=False)}```\n")
    (folder / "README.md").write_text(card, encoding="utf-8")
