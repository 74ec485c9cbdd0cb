"""What a model folder's tokenizer offers beyond text: the token a sequence may start from."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def start_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token to start a sequence from, or to stand for an empty prompt: BOS, else EOS (None
    when the tokenizer has neither)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
