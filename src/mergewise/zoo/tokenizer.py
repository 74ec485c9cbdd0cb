"""A char-level Hugging Face tokenizer: tiny vocabulary, so a ~1M-parameter model spends its weights on
the tasks rather than on embeddings, yet it loads with AutoTokenizer like any real one."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHARACTERS = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (BPE with no merges never joins characters); every
    encoded text starts with <s>, as the models were trained."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS.values())}
    for character in CHARACTERS:
        vocab[character] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def keep_known_characters(text: str) -> str:
    """Drop characters outside the vocabulary so the corpus never trains the unknown token."""
    known = set(CHARACTERS)
    return "".join(character for character in text if character in known)
