"""`chat_template:` in a recipe reaches the output's tokenizer, as in mergekit: a named format, `auto`
(the inputs' most common template) or a Jinja string; an unknown name is one error line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

import mergewise
from mergewise.chat_templates import NAMED
from mergewise.cli import main

CHAT = [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]


def recipe(models: list[Path], chat_template: str) -> dict:
    return {"merge_method": "linear", "chat_template": chat_template,
            "models": [{"model": str(path), "parameters": {"weight": 1.0}} for path in models]}


def rendered(folder: Path) -> str:
    return AutoTokenizer.from_pretrained(folder).apply_chat_template(CHAT, tokenize=False,
                                                                     add_generation_prompt=True)


@pytest.mark.parametrize("name, marker", [("chatml", "<|im_start|>user\ntwo plus two?<|im_end|>"),
                                          ("llama3", "<|start_header_id|>user<|end_header_id|>"),
                                          ("alpaca", "### Instruction:\ntwo plus two?"),
                                          ("mistral", "[INST] two plus two? [/INST]")])
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
    assert capsys.readouterr().err.strip() == ("error: chat_template: unknown template 'chatmll' (use auto, chatml, "
                                              "llama3, alpaca, mistral, or a Jinja template)")
    assert not (tmp_path / "out").exists()
