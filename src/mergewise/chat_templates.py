"""The output's chat template (`chat_template:` in a recipe, as in mergekit): a named format, `auto`
(the template most of the input models share), or a Jinja template given as it is."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergewise.checkpoint.files import read_text
from mergewise.checkpoint.vocabulary import TOKENIZER_CONFIG, TokenizerConfig, read_tokenizer_config
from mergewise.checkpoint.writer import write_text
from mergewise.errors import MergewiseError, tolerated

NAMED = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
}


def resolve_chat_template(setting: str, models: list[Path], *, strict: bool = False) -> str | None:
    """The Jinja template a recipe's `chat_template` stands for (None: `auto` found none among the
    inputs, and the output gets none, as mergekit's); one error naming the setting if it is neither
    a known name, `auto`, nor a template that compiles."""
    if setting in NAMED:
        return NAMED[setting]
    if setting == "auto":
        found = Counter(template for model in models if (template := model_chat_template(model)))
        if not found:
            tolerated(
                "chat_template: auto, but none of the input models has a chat template; the output gets "
                "none, as mergekit writes none",
                strict=strict,
            )
            return None
        return found.most_common(1)[0][0]
    if "{{" in setting or "{%" in setting:
        return checked_template(setting, "chat_template")
    raise MergewiseError(
        f"chat_template: unknown template {setting!r} (use auto, {', '.join(NAMED)}, or a Jinja template)"
    )


def checked_template(template: str, where: str) -> str:
    """`template` if it compiles as transformers compiles a chat template (jinja2's sandbox)."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateError as error:
        lineno = getattr(error, "lineno", None)  # a syntax error's
        line = f" at line {lineno}" if lineno else ""
        raise MergewiseError(f"{where}: not a valid Jinja template ({error.message or error}{line})") from None
    return template


def model_chat_template(folder: Path) -> str | None:
    """A model folder's chat template: `chat_template.jinja`, else tokenizer_config.json's (its
    "default" one, when it names several)."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists() or jinja.is_symlink():
        return checked_template(read_text(jinja, "chat template", folder=folder), str(jinja))
    template = TokenizerConfig.model_validate(read_tokenizer_config(folder)).default_template
    return checked_template(template, str(folder / TOKENIZER_CONFIG)) if template is not None else None


def write_chat_template(folder: Path, template: str) -> None:
    """Give the output's tokenizer `template`: in chat_template.jinja, which transformers reads first,
    and in tokenizer_config.json, for older readers (the one copied into `folder`, checked by
    `read_tokenizer_config` before the merge started, or the one transformers wrote)."""
    write_text(folder / "chat_template.jinja", template)
    config = {**read_tokenizer_config(folder), "chat_template": template}
    write_text(folder / TOKENIZER_CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
