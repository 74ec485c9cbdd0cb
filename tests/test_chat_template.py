"""`chat_template:` in a recipe reaches the output's tokenizer, as in mergekit: a named format, `auto`
(the inputs' most common template) or a Jinja string; an unknown name is one error line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

import mergewise
from mergewise.chat_templates import NAMED
from mergewise.checkpoint import StreamingShardWriter
from mergewise.cli import main

CHAT = [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]


def recipe(models: list[Path], chat_template: str) -> dict:
    return {
        "merge_method": "linear",
        "chat_template": chat_template,
        "models": [{"model": str(path), "parameters": {"weight": 1.0}} for path in models],
    }


def rendered(folder: Path) -> str:
    return AutoTokenizer.from_pretrained(folder).apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize(
    "name, marker",
    [
        ("chatml", "<|im_start|>user\ntwo plus two?<|im_end|>"),
        ("llama3", "<|start_header_id|>user<|end_header_id|>"),
        ("alpaca", "### Instruction:\ntwo plus two?"),
        ("mistral", "[INST] two plus two? [/INST]"),
    ],
)
def test_a_named_template_is_written_into_the_output_tokenizer(name, marker, tiny_family, tmp_path):
    family = tiny_family("llama")
    mergewise.merge(recipe(list(family.fine_tunes[:2]), name), tmp_path / "out", quiet=True)
    assert marker in rendered(tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == NAMED[name]


def test_auto_takes_the_template_most_inputs_share_and_jinja_is_taken_as_it_is(tiny_family, tmp_path):
    family = tiny_family("llama")
    models = [Path(shutil.copytree(path, tmp_path / path.name)) for path in family.fine_tunes]
    for model, template in zip(models, ("{{ 'A' }}", "{{ 'B' }}", "{{ 'B' }}")):
        (model / "chat_template.jinja").write_text(template)
    mergewise.merge(recipe(models, "auto"), tmp_path / "auto", quiet=True)
    assert rendered(tmp_path / "auto") == "B"
    mergewise.merge(recipe(models, "{{ 'custom' }}"), tmp_path / "jinja", quiet=True)
    assert rendered(tmp_path / "jinja") == "custom"


def test_an_unknown_template_name_is_one_error_line(tiny_family, tmp_path, capsys):
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump(recipe(list(tiny_family("llama").fine_tunes[:2]), "chatmll")))
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: chat_template: unknown template 'chatmll' (use auto, chatml, "
        "llama3, alpaca, mistral, or a Jinja template)"
    )
    assert not (tmp_path / "out").exists()


def refuse_writes(*args, **kwargs):
    raise AssertionError("a tensor was merged before the bad input was refused")


def one_error_line(capsys, status: int) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    "setting, file, content, named",
    [
        ("chatml", "tokenizer_config.json", "{not json", "not valid JSON"),
        ("chatml", "tokenizer_config.json", '["a", "list"]', "not a JSON object"),
        ("auto", "tokenizer_config.json", "[" * 20_000 + "]" * 20_000, "nested more than 64 levels deep"),
        ("auto", "chat_template.jinja", b"{{ '\xff\xfe' }}", "not UTF-8 text"),
        ("auto", "chat_template.jinja", "{% if %}", "not a valid Jinja template"),
        ("{% for message in messages %}", None, None, "chat_template: not a valid Jinja template"),
    ],
)
def test_a_template_or_tokenizer_config_that_cannot_serve_is_refused_before_the_merge(
    setting, file, content, named, tiny_family, tmp_path, capsys, monkeypatch
):
    """Found after the whole merge, or written into the output and found by whoever loads it."""
    family = tiny_family("llama")
    models = [Path(shutil.copytree(path, tmp_path / path.name)) for path in family.fine_tunes[:2]]
    if file is not None:
        (models[0] / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump(recipe(models, setting)))
    monkeypatch.setattr(StreamingShardWriter, "write", refuse_writes)
    error = one_error_line(capsys, main(["merge", str(config), str(tmp_path / "out"), "--quiet"]))
    assert named in error and (file is None or str(models[0] / file) in error)
    assert not (tmp_path / "out").exists()


def test_auto_takes_the_default_of_templates_listed_by_name(tiny_family, tmp_path):
    """tokenizer_config.json may list templates by name; transformers applies the "default" one."""
    models = [Path(shutil.copytree(path, tmp_path / path.name)) for path in tiny_family("llama").fine_tunes[:2]]
    for model in models:
        config_path = model / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = [
            {"name": "tool_use", "template": "{{ 'T' }}"},
            {"name": "default", "template": "{{ 'D' }}"},
        ]
        config_path.write_text(json.dumps(config))
    mergewise.merge(recipe(models, "auto"), tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ 'D' }}" and rendered(tmp_path / "out") == "D"


def test_a_template_holding_a_code_fence_stays_inside_the_model_cards_recipe(tiny_family, tmp_path):
    template = "{{ 'Answer in markdown:' }}\n```\n# not a heading of the card\n```\n"
    written = recipe(list(tiny_family("llama").fine_tunes[:2]), template)
    mergewise.merge(written, tmp_path / "out", quiet=True)
    card = (tmp_path / "out" / "README.md").read_text()
    opening = re.search(r"^(`{3,})yaml$", card, re.MULTILINE)
    closing = card.index(f"\n{opening.group(1)}\n", opening.end())
    assert len(opening.group(1)) > 3 and "\n# not a heading" not in card[: opening.start()] + card[closing:]
    assert yaml.safe_load(card[opening.end() : closing])["chat_template"] == template
