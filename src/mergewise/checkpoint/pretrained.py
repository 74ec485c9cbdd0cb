"""Loading a model folder with transformers, without ever running code that came with it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mergewise.checkpoint.files import check_folder_links
from mergewise.errors import MergewiseError

Loaded = TypeVar("Loaded")


def load_pretrained(
    loader: Callable[..., Loaded], folder: Path, *, trust_remote_code: bool = False, **options: Any
) -> Loaded:
    """`loader(folder, **options)`, a transformers `from_pretrained`, running the folder's own Python
    (an `auto_map` in its config or tokenizer files) only when trusted: left undecided, transformers
    asks on stdin, and a "y" runs code that came with a downloaded folder. No file it reads may be a
    symlink out of the folder (`check_folder_links`)."""
    if Path(folder).is_dir():
        check_folder_links(Path(folder))
    try:
        return loader(folder, trust_remote_code=trust_remote_code, **options)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise MergewiseError(
            f"{folder}: needs its own Python code (auto_map); pass --trust-remote-code "
            "(trust_remote_code=True) only if you trust that code"
        ) from None


def load_config_and_tokenizer(folder: Path, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A folder's transformers config and tokenizer, the config first (it says whether the folder's
    own code would run); one error naming the folder when either cannot load."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = load_pretrained(AutoConfig.from_pretrained, folder, trust_remote_code=trust_remote_code)
        tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, folder, trust_remote_code=trust_remote_code, config=config
        )
    except (OSError, ValueError) as error:
        raise MergewiseError(f"{folder}: cannot load its config or tokenizer ({str(error).splitlines()[0]})") from None
    return config, tokenizer
