"""Vocabularies of a merge: the output tokenizer (`tokenizer_source:` or the `tokenizer:` block) and
each input's embedding and head rows re-indexed into it, with the rules of mergekit 0.1.5.

The output vocabulary is the base's (its tokenizer stripped of tokens beyond its embedding), a named
model's, or the union of every input's (the base's tokens keep their ids; the others' are appended,
plain tokens first, then added tokens), plus the tokens `tokenizer.tokens` names. Each input's rows
follow its own vocabulary; where an input lacks a token (or the token is forced) its row is a
default, the same for every input of the tensor: the row of the token's one holder, else the base's,
else the mean of the holders', else zeros; a `tokenizer.tokens` entry names the source instead.
Rows past the vocabulary (`pad_to_multiple_of`) are each input's mean row.

Only headers and tokenizer files are read while planning; rows are read, re-indexed, as the engine
streams them. Tokenizers load without a folder's own code.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergewise.checkpoint.files import inside_folder, read_json, validated
from mergewise.checkpoint.output import TOKENIZER_FILES
from mergewise.checkpoint.pretrained import load_pretrained
from mergewise.checkpoint.reader import ModelFolder
from mergewise.errors import MergewiseError

TOKENIZER_CONFIG = "tokenizer_config.json"
# A folder holding none of these has no tokenizer of its own; mergekit reads it with the base's.
TOKENIZER_DEFINITIONS = ("tokenizer.json", TOKENIZER_CONFIG, "tokenizer.model", "vocab.json", "vocab.txt")
# Rows wanted from a tensor at most this far apart are read in one span (fewer, larger reads).
GATHER_GAP = 64
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


@dataclass(frozen=True)
class TokenRule:
    """A `tokenizer.tokens` entry with its model resolved by the plan: rows of `model` (of the same
    token, or of `token` / `token_id` in the model's own vocabulary), zeros with `zero`, no source
    at all when neither (an error wherever a row is needed); `force` applies it to every input."""

    key: str
    model: ModelFolder | None = None
    zero: bool = False
    token: str | None = None
    token_id: int | None = None
    force: bool = False


Template = Annotated[str, Field(strict=True)]


class NamedTemplate(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: Template
    template: Template


class TokenizerConfig(BaseModel):
    """tokenizer_config.json's chat template: one, or several by name, listed or mapped (transformers
    applies the "default" one). Checked whenever a tokenizer is loaded: transformers writes out a
    template it loaded (a merge's new vocabulary), and one it cannot write failed after the merge."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    chat_template: Template | list[NamedTemplate] | dict[str, Template] | None = None

    @property
    def default_template(self) -> str | None:
        if isinstance(self.chat_template, list):
            return next((entry.template for entry in self.chat_template if entry.name == "default"), None)
        if isinstance(self.chat_template, dict):
            return self.chat_template.get("default")
        return self.chat_template


def read_tokenizer_config(folder: Path) -> dict:
    """A folder's tokenizer_config.json ({} when it has none), its chat template checked."""
    path = folder / TOKENIZER_CONFIG
    if not (path.exists() or path.is_symlink()):
        return {}
    config = read_json(path, "tokenizer config", folder=folder, finite=False)
    if not isinstance(config, dict):
        raise MergewiseError(f"{path}: not a JSON object")
    validated(TokenizerConfig, config, str(path))
    return config


def load_tokenizer(folder: Path):
    """The folder's tokenizer through transformers, never running the folder's own code; None when
    the folder has no tokenizer files."""
    present = [folder / name for name in TOKENIZER_FILES if (folder / name).exists() or (folder / name).is_symlink()]
    for file in present:
        inside_folder(file, folder, "tokenizer file")
    if not any(file.name in TOKENIZER_DEFINITIONS for file in present):
        return None
    read_tokenizer_config(folder)
    from transformers import AutoTokenizer

    try:
        return load_pretrained(AutoTokenizer.from_pretrained, folder, local_files_only=True)
    except MergewiseError:
        raise
    except Exception as error:  # transformers raises many types for a tokenizer it cannot read
        raise MergewiseError(f"{folder}: its tokenizer cannot be read ({str(error).splitlines()[0][:200]})") from None


def vocab_size(model: ModelFolder, tokens: int) -> int:
    """The rows of the model's vocabulary tensors by its config (mergekit's reading), else `tokens`;
    never more than its input embedding holds (a config may claim more)."""
    declared = model.declared.text.vocab_size or model.declared.vocab_size or tokens
    held = [
        info.shape[0] for name, info in model.tensors.items() if name.endswith(INPUT_EMBEDDING_SUFFIXES) and info.shape
    ]
    return min([declared, *held])


def _stripped(tokenizer, size: int, folder: Path):
    """The tokenizer without the tokens whose ids are past the model's `size` rows (a BPE tokenizer
    longer than its embedding), as mergekit reads the base."""
    unused = {token for token, index in tokenizer.get_vocab().items() if index >= size}
    if not unused:
        return tokenizer
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise MergewiseError(
            f"{folder}: its tokenizer has {len(unused)} tokens past vocab_size {size}, which only a "
            f"BPE tokenizer can drop (this one is {state['model']['type']})"
        )
    state["added_tokens"] = [entry for entry in state["added_tokens"] if entry["id"] < size]
    for token in unused:
        state["model"]["vocab"].pop(token, None)
    state["model"]["merges"] = [
        pair
        for pair in state["model"]["merges"]
        if not unused.intersection(pair.split(" ") if isinstance(pair, str) else pair)
    ]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    return tokenizer


@dataclass(frozen=True)
class InputVocabulary:
    """One input's tokenizer vocabulary and, per output token, its row (-1: it lacks the token)."""

    tokens: dict[str, int]
    rows: torch.Tensor


class OutputVocabulary:
    """The output tokenizer, its vocabulary, and each recipe model's rows in it."""

    def __init__(self, tokenizer, source: Path, pad_to_multiple_of: int | None):
        self.tokenizer = tokenizer
        self.source = source
        self.inputs: dict[ModelFolder, InputVocabulary] = {}
        self.tokens = tokenizer.get_vocab()
        self.real = len(self.tokens)
        if set(self.tokens.values()) != set(range(self.real)):
            raise MergewiseError(
                f"{source}: the output tokenizer's ids are not 0..{self.real - 1} without gaps, "
                "so they cannot index embedding rows"
            )
        multiple = pad_to_multiple_of or 1
        if multiple > self.real:  # padding at most doubles the rows
            raise MergewiseError(
                f"tokenizer.pad_to_multiple_of: {multiple} is more than the {self.real} tokens of the output vocabulary"
            )
        self.rows = math.ceil(self.real / multiple) * multiple
        self.names = sorted(self.tokens, key=self.tokens.get)

    def add_input(self, model: ModelFolder, tokens: dict[str, int], size: int) -> None:
        """Index a model whose tokenizer vocabulary is `tokens` and whose tensors have `size` rows."""
        rows = torch.tensor([tokens.get(token, -1) for token in self.names], dtype=torch.long)
        self.inputs[model] = InputVocabulary(tokens, torch.where(rows < size, rows, -1))

    def save(self, folder: Path) -> None:
        """Write the output tokenizer (as transformers saves it, like mergekit), and the source's
        generation_config.json."""
        self.tokenizer.save_pretrained(folder)
        generation = self.source / "generation_config.json"
        if generation.exists() or generation.is_symlink():
            shutil.copyfile(inside_folder(generation, self.source, "generation config"), folder / generation.name)

    def align(
        self,
        name: str,
        peers: list[tuple[ModelFolder, str]],
        base: ModelFolder | None,
        rules: dict[str, TokenRule],
        compute_dtype: torch.dtype | None,
    ) -> list[PeerRows | None]:
        """How each peer's tensor `name` (its embedding or head, by its own tensor name) reads in the
        output vocabulary: None where its own rows [a, b) already are those rows. `peers` are every
        input of the tensor in mergekit's order (the recipe's, the base last if it is not listed):
        the defaults of a token depend on all of them."""
        tensor_rows = [model.tensors[tensor].shape[0] for model, tensor in peers]
        held = [
            torch.where(self.inputs[model].rows < limit, self.inputs[model].rows, -1)
            for (model, _), limit in zip(peers, tensor_rows)
        ]
        present = torch.stack([rows >= 0 for rows in held])
        forced = torch.zeros(self.real, dtype=torch.bool)
        for token, rule in rules.items():
            forced[self.tokens[token]] = rule.force
        base_peer = next((index for index, (model, _) in enumerate(peers) if model is base), None)
        defaults = {
            token_id: self._default(token_id, name, peers, held, tensor_rows, base_peer, rules)
            for token_id in ((~present.all(0)) | forced).nonzero().flatten().tolist()
        }
        dtype = compute_dtype or reduce(torch.promote_types, (model.tensors[tensor].dtype for model, tensor in peers))
        aligned = AlignedTensor(
            peers, [torch.where(forced, -1, rows) for rows in held], defaults, self.real, self.rows, dtype
        )
        identity = torch.arange(self.real)
        return [
            None
            if (
                self.rows == self.real
                and torch.equal(own, identity)
                and (compute_dtype is not None or model.tensors[tensor].dtype == dtype)
            )
            else PeerRows(aligned, index)
            for index, ((model, tensor), own) in enumerate(zip(peers, aligned.own))
        ]

    def _default(self, token_id: int, name: str, peers, held, tensor_rows, base_peer, rules) -> tuple:
        """The (peer, row) pairs whose mean is the token's default row: none for zeros."""
        token = self.names[token_id]
        holders = [index for index, rows in enumerate(held) if rows[token_id] >= 0]
        rule = rules.get(token)
        if rule is None:
            if len(holders) == 1 or (len(holders) > 1 and base_peer in holders):
                donor = holders[0] if len(holders) == 1 else base_peer
                return ((donor, int(held[donor][token_id])),)
            return tuple((index, int(held[index][token_id])) for index in holders)
        if rule.zero:
            return ()
        if rule.model is None:
            lacking = [str(model.path) for index, (model, _) in enumerate(peers) if index not in holders]
            why = f"{', '.join(lacking)} lack it" if lacking else "it is forced"
            raise MergewiseError(
                f"{rule.key}: token {token!r} needs a source ({why}): a model, "
                "{kind: zero} or {kind: model_token, model: ..., token: ...}"
            )
        peer = next((index for index, (model, _) in enumerate(peers) if model is rule.model), None)
        if peer is None:
            raise MergewiseError(
                f"{rule.key}: {rule.model.reference} is not an input of tensor {name}, so it "
                "cannot give that tensor's row"
            )
        if rule.token is not None:
            row = self.inputs[rule.model].tokens.get(rule.token, -1)
            if not 0 <= row < tensor_rows[peer]:
                raise MergewiseError(f"{rule.key}.token: {rule.model.reference} has no token {rule.token!r}")
        elif rule.token_id is not None:
            row = rule.token_id
            if row >= tensor_rows[peer]:
                raise MergewiseError(
                    f"{rule.key}.token_id: {row} is past the {tensor_rows[peer]} rows of "
                    f"{rule.model.reference}'s {name}"
                )
        else:
            row = int(held[peer][token_id])
            if row < 0:
                raise MergewiseError(f"{rule.key}: {rule.model.reference} has no token {token!r}")
        return ((peer, row),)


@dataclass(frozen=True)
class PeerRows:
    """One input's rows of a vocabulary tensor, in the output vocabulary."""

    aligned: AlignedTensor
    peer: int

    def read(self, rows: slice) -> torch.Tensor:
        return self.aligned.read(self.peer, rows)


class AlignedTensor:
    """A vocabulary tensor of every peer re-indexed into the output vocabulary. The default rows
    (read from the peers once, when first needed) and each peer's padding row are kept; the rest is
    read per row chunk."""

    def __init__(
        self,
        peers: list[tuple[ModelFolder, str]],
        own: list[torch.Tensor],
        defaults: dict[int, tuple],
        real: int,
        rows: int,
        dtype: torch.dtype,
    ):
        self.peers = peers
        self.own = own
        self.defaults = defaults
        self.real = real
        self.rows = rows
        self.dtype = dtype
        model, tensor = peers[0]
        self.row_shape = model.tensors[tensor].shape[1:]
        self._lock = threading.RLock()
        self._default_rows: dict[int, torch.Tensor] | None = None
        self._padding: dict[int, torch.Tensor] = {}

    def read(self, peer: int, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.rows)
        out = torch.zeros((stop - start, *self.row_shape), dtype=self.dtype)
        own = self.own[peer][start : min(stop, self.real)]
        held = (own >= 0).nonzero().flatten()
        if len(held):
            model, tensor = self.peers[peer]
            out[held] = gather_rows(model, tensor, own[held]).to(self.dtype)
        lacking = (own < 0).nonzero().flatten().tolist()
        if lacking:
            defaults = self._defaults()
            for position in lacking:
                out[position] = defaults[start + position]
        if stop > self.real:
            out[max(self.real - start, 0) :] = self._padding_row(peer)
        return out

    def _defaults(self) -> dict[int, torch.Tensor]:
        """Each default row, as mergekit computes it in the working dtype: a copy, or a running sum
        of the holders' rows in peer order divided by their count."""
        with self._lock:
            if self._default_rows is None:
                wanted = {pair for sources in self.defaults.values() for pair in sources}
                read = {}
                for peer in {peer for peer, _ in wanted}:
                    model, tensor = self.peers[peer]
                    peer_rows = sorted(row for source, row in wanted if source == peer)
                    values = gather_rows(model, tensor, torch.tensor(peer_rows)).to(self.dtype)
                    read.update({(peer, row): value for row, value in zip(peer_rows, values)})
                self._default_rows = {}
                for token_id, sources in self.defaults.items():
                    if len(sources) == 1:
                        self._default_rows[token_id] = read[sources[0]]
                        continue
                    total = torch.zeros(self.row_shape, dtype=self.dtype)
                    for source in sources:
                        total = total + read[source]
                    if sources:
                        total /= len(sources)
                    self._default_rows[token_id] = total
            return self._default_rows

    def _padding_row(self, peer: int) -> torch.Tensor:
        """The peer's mean row over the whole vocabulary (mergekit's padding), from the re-indexed rows."""
        with self._lock:
            if peer not in self._padding:
                self._padding[peer] = torch.mean(self.read(peer, slice(0, self.real)), dim=0)
            return self._padding[peer]


def gather_rows(model: ModelFolder, tensor: str, wanted: torch.Tensor) -> torch.Tensor:
    """Rows `wanted` (any order) of a tensor, mapped as a few spans of nearby rows."""
    unique, position = torch.unique(wanted, return_inverse=True)
    breaks = ((unique[1:] - unique[:-1]) > GATHER_GAP).nonzero().flatten() + 1
    pieces = []
    for group in torch.tensor_split(unique, breaks):
        first = int(group[0])
        pieces.append(model.map_rows(tensor, slice(first, int(group[-1]) + 1))[group - first])
    return torch.cat(pieces)[position]


def build_vocabulary(
    source: str | ModelFolder,
    base: ModelFolder,
    models: list[ModelFolder],
    added: Iterable[str],
    pad_to_multiple_of: int | None,
    key: str,
) -> OutputVocabulary:
    """The output vocabulary from `source` (`base`, `union` or a model), with the tokens `added`
    appended, and each of `models` (every recipe model, `base` first) re-indexed into it."""
    tokenizers = {model: load_tokenizer(model.path) for model in models}
    if tokenizers[base] is None:
        raise MergewiseError(f"{key}: the base {base.path} has no tokenizer files to build the vocabulary from")
    sizes = {model: vocab_size(model, len((tokenizers[model] or tokenizers[base]).get_vocab())) for model in models}
    if isinstance(source, ModelFolder):
        tokenizer, source_folder = load_tokenizer(source.path), source.path
        if tokenizer is None:
            raise MergewiseError(f"{key}: {source.path} has no tokenizer files")
    else:
        tokenizer, source_folder = _stripped(load_tokenizer(base.path), sizes[base], base.path), base.path
        if source == "union":
            _add_union(tokenizer, [(tokenizers[model], sizes[model]) for model in models if tokenizers[model]])
        elif source != "base":
            raise MergewiseError(f"{key}: {source!r} is neither base, union nor a model")
    present = tokenizer.get_vocab()
    tokenizer.add_tokens([token for token in dict.fromkeys(added) if token not in present])
    vocabulary = OutputVocabulary(tokenizer, source_folder, pad_to_multiple_of)
    for model in models:
        vocabulary.add_input(model, (tokenizers[model] or tokenizers[base]).get_vocab(), sizes[model])
    return vocabulary


def _add_union(tokenizer: Any, inputs: list[tuple[Any, int]]) -> None:
    """Append to the base's `tokenizer` every token of `inputs` (tokenizer, rows) it lacks: the plain
    tokens in input and id order, then the added tokens (the first input's settings for each)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for own, size in inputs:
        for token, index in sorted(own.get_vocab().items(), key=lambda item: item[1]):
            if index < size:
                plain.setdefault(token)
        for index, info in own.added_tokens_decoder.items():
            if index < size:
                added.setdefault(info.content, info)
    known = tokenizer.get_vocab()
    # One call each: the tokenizer rebuilds its added-token matcher per call, so token by token the
    # union took time quadratic in the tokens it adds.
    tokenizer.add_tokens([token for token in plain if token not in added and token not in known])
    tokenizer.add_tokens(list(added.values()))
