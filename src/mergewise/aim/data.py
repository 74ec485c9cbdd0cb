"""Calibration text → token blocks, the input of the statistics pass.

AIM's statistics only need task-agnostic text. Sources: a text / JSONL file or a folder of them
(the normal path), the base model's own samples (`self`, offline and data-free), or a Hugging Face
dataset (`hf:NAME`, online only). Documents become blocks exactly as the reference's
`get_calib_dataset` makes them (see DOCUMENT_CONVENTIONS), so that the statistics match it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from mergewise.checkpoint.files import iter_jsonl, read_lines
from mergewise.checkpoint.tokens import start_token_id
from mergewise.errors import MergewiseError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md")

# How documents become blocks (the reference's conventions), recorded in the statistics' metadata.
DOCUMENT_CONVENTIONS = {
    "special_tokens": "tokenizer_default",  # tokenizer.encode(document.strip()), a BOS for Llama
    "document_length": "1_to_seq_len_tokens_with_special",  # the others are skipped
    "document_order": "as_given",  # user data is not shuffled
    "partial_block": "dropped",  # only whole blocks of seq_len tokens
}
SAMPLED_CONVENTIONS = {"sampling": "temperature_1_from_bos"}  # `samples` whole blocks, seeded
# A document of more characters than this per token of a block cannot fit one (English text takes
# about 4 a token, code's runs of spaces a few more): it is skipped without being tokenized, which
# for a document of megabytes took gigabytes.
CHARACTERS_PER_TOKEN = 32


def read_documents(source: str, seq_len: int) -> Iterator[str | None]:
    """The documents of a text file (its non-blank, blank-line-separated paragraphs), a JSONL file
    (its `text` fields), or every such file in a folder, in sorted order, streamed a line at a time:
    however large the data, only the documents the blocks take are read, one at a time. A document
    too long for `seq_len` tokens by its characters alone (`fits`) comes as None, never held whole."""
    path = Path(source).expanduser()
    limit = CHARACTERS_PER_TOKEN * seq_len
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix in TEXT_SUFFIXES)
        if not files:
            raise MergewiseError(f"--data {source}: folder holds no .txt or .jsonl files")
        return (document for file in files for document in _file_documents(file, limit))
    if path.is_file():
        return _file_documents(path, limit)
    raise MergewiseError(
        f"--data {source}: no such file or folder (use a text/JSONL file, a folder, 'self' or 'hf:NAME')"
    )


def _file_documents(file: Path, limit: int) -> Iterator[str | None]:
    if file.suffix in (".jsonl", ".json"):  # a JSON escape spells a character in up to 6 bytes
        for record in iter_jsonl(file, "calibration data", ("text",), max_line_bytes=6 * limit + 4096):
            yield None if record is None else record["text"]
        return
    lines: list[str] | None = []  # the paragraph so far; None once it is longer than `limit`
    size = 0
    for _, line in read_lines(file, "calibration data", max_line_bytes=4 * limit):  # UTF-8: ≤ 4 bytes a character
        if line == "":
            yield from _paragraph(lines)
            lines, size = [], 0
        elif lines is not None:
            if line is None or size + len(line) + 1 > limit:  # None: a line over the limit, unread
                lines = None
            else:
                size += len(line) + 1
                lines.append(line)
    yield from _paragraph(lines)


def _paragraph(lines: list[str] | None) -> Iterator[str | None]:
    if lines is None:
        yield None
    elif text := "\n".join(lines).strip():
        yield text


def hub_documents(name: str) -> Iterator[str]:
    """The `text` column of a Hugging Face dataset's validation (else train) split, in its stored
    order, read lazily: only the documents that the blocks need are decoded."""
    try:
        import datasets
    except ImportError:
        raise MergewiseError(f"--data hf:{name}: the 'datasets' package is not installed") from None
    try:
        splits = datasets.load_dataset(name)
    except Exception as error:  # noqa: BLE001 (offline, unknown name, gated: datasets raises many types)
        raise MergewiseError(
            f"--data hf:{name}: cannot load the dataset (needs network access; "
            f"offline, use a local file or 'self'): {str(error).splitlines()[0]}"
        ) from None
    split = splits.get("validation") or splits.get("train") or next(iter(splits.values()))
    if "text" not in split.column_names:
        raise MergewiseError(f"--data hf:{name}: dataset has no 'text' column ({', '.join(split.column_names)})")
    return (record["text"] for record in split)


def blocks_from_documents(
    documents: Iterable[str | None], tokenizer, samples: int, seq_len: int, origin: str
) -> list[torch.Tensor]:
    """Blocks of `seq_len` tokens from the first `samples` documents of 1 to `seq_len` tokens, as the
    reference makes them (DOCUMENT_CONVENTIONS); a document (None: one left unread) of more than
    CHARACTERS_PER_TOKEN characters per token of a block is skipped untokenized, as too long."""
    ids: list[int] = []
    kept = 0
    for document in documents:
        if kept == samples:
            break
        if document is None or len(document) > CHARACTERS_PER_TOKEN * seq_len:
            continue
        tokens = tokenizer.encode(document.strip())
        if not tokens or len(tokens) > seq_len:
            continue
        ids.extend(tokens)
        kept += 1
    whole_blocks = len(ids) // seq_len
    if whole_blocks == 0:
        raise MergewiseError(
            f"--data {origin}: {len(ids)} tokens in {kept} usable documents, fewer than one "
            f"block of --seq-len {seq_len}"
        )
    return [torch.tensor([ids[start : start + seq_len]]) for start in range(0, whole_blocks * seq_len, seq_len)]


def self_generated_blocks(model, tokenizer, samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """`samples` sequences of `seq_len` tokens sampled from the model itself (plain temperature-1
    sampling from its BOS token), seeded: calibration text without any dataset."""
    start = start_token_id(tokenizer)
    if start is None:
        raise MergewiseError("--data self: the tokenizer has neither a BOS nor an EOS token to start from")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        generated = model.generate(
            torch.full((samples, 1), start, device=device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=start,
            attention_mask=torch.ones((samples, 1), dtype=torch.long, device=device),
        )
    return [row.unsqueeze(0).cpu() for row in generated]
