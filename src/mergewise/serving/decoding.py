"""Batched, token-by-token decoding with per-sequence sampling and stopping.

transformers' `generate` takes one generation config per batch; a server's batch mixes requests that
each ask for their own length, temperature, nucleus, seed and stop strings, that stream their text
as it comes and that a client may abandon, and that arrive while others decode. So a batch is
decoded here a token at a time: a prefill of the left-padded prompts of the sequences that join,
then one forward per step with the cache, each sequence choosing its token from the float32 logits
of its own row (greedy is the arg-max, as `generate`'s is) and leaving the batch when it ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

REPLACEMENT = "\ufffd"  # what decoding shows for a character whose bytes are not all generated yet


@dataclass(frozen=True)
class Sampling:
    """How one request chooses its tokens (OpenAI's parameters)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class Completion:
    """One sequence being decoded: its prompt, the tokens chosen so far, the text a client has been
    given, and why it ended. Text is released as it becomes final: a character still missing bytes,
    or an ending that may yet become a stop string, is held back; a stop string is never shown."""

    def __init__(
        self, prompt_ids: Sequence[int], sampling: Sampling, tokenizer: PreTrainedTokenizerBase, end_ids: frozenset[int]
    ):
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.end_ids = end_ids
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.finish_reason: str | None = None  # "stop" or "length" once it ended
        self.cancelled = False
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None

    @property
    def active(self) -> bool:
        return self.finish_reason is None and not self.cancelled

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's float32 logits."""
        if self.sampling.temperature == 0:
            return int(logits.argmax())
        probabilities = torch.softmax(logits / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1:
            ordered, order = probabilities.sort(descending=True)
            # keep the most likely tokens until their mass reaches top_p (always the first)
            outside = ordered.cumsum(-1) - ordered > self.sampling.top_p
            probabilities = probabilities.scatter(-1, order, ordered.masked_fill(outside, 0))
        return int(torch.multinomial(probabilities, 1, generator=self.generator))

    def add(self, token: int) -> str:
        """Take the chosen token; return the text it releases."""
        self.tokens.append(token)
        if token in self.end_ids:
            self.finish_reason = "stop"
            return self._release(self._decoded(self.tokens[:-1]), final=True)
        text = self._decoded(self.tokens)
        cut = min((found for stop in self.sampling.stop if (found := text.find(stop)) >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            return self._release(text[:cut], final=True)
        if len(self.tokens) >= self.sampling.max_tokens:
            self.finish_reason = "length"
            return self._release(text, final=True)
        return self._release(text, final=False)

    def _decoded(self, tokens: list[int]) -> str:
        return cast(str, self.tokenizer.decode(tokens, skip_special_tokens=True))  # one sequence: one str

    def _release(self, text: str, *, final: bool) -> str:
        if not final:
            text = text.rstrip(REPLACEMENT)
            held = max(
                (size for stop in self.sampling.stop for size in range(1, len(stop)) if text.endswith(stop[:size])),
                default=0,
            )
            text = text[: len(text) - held]
        if not text.startswith(self.text):  # decoding re-spelled what was released: wait for it to settle
            return ""
        released, self.text = text[len(self.text) :], text
        return released


class DecodingBatch:
    """Sequences decoding together, one forward per step with one cache. New sequences join between
    steps (their own prefill, then their cache rows are appended, left-padded to a common length),
    and a sequence leaves its row when it ends, so a batch runs as long as requests keep coming
    instead of waiting for its slowest member. Caches that are not plain per-layer key/value tensors
    (sliding windows, state-space layers) cannot take rows that way: their batch takes no newcomers."""

    def __init__(self, model: PreTrainedModel, pad_id: int, device: torch.device):
        self.model = model
        self.pad_id = pad_id
        self.device = device
        self.completions: list[Completion] = []
        self.cache: DynamicCache | None = None
        self.attention_mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.positions = torch.zeros((0, 1), dtype=torch.long, device=device)  # each row's next position
        self.next_ids = torch.zeros((0, 1), dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def takes_newcomers(self) -> bool:
        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    @torch.no_grad()
    def join(self, completions: Sequence[Completion]) -> list[tuple[int, str]]:
        """Prefill `completions` and add them as the last rows; (row, text its first token releases)."""
        width = max(len(completion.prompt_ids) for completion in completions)
        input_ids = torch.full((len(completions), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, completion in enumerate(completions):
            input_ids[row, width - len(completion.prompt_ids) :] = torch.tensor(completion.prompt_ids)
            attention_mask[row, width - len(completion.prompt_ids) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, attention_mask, position_ids, cache)
        if self.cache is None:
            self.cache, self.attention_mask = cache, attention_mask
        else:
            self.attention_mask = self._append_rows(cache, attention_mask)
        self.positions = torch.cat([self.positions, position_ids[:, -1:] + 1])
        self.completions.extend(completions)
        return self._choose(logits, range(len(self) - len(completions), len(self)))

    @torch.no_grad()
    def step(self) -> list[tuple[int, str]]:
        """One token for every sequence still decoding; (row, text it releases) for each."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(self), 1))], dim=1)
        assert self.cache is not None  # a batch steps after its first join
        logits = self._forward(self.next_ids, self.attention_mask, self.positions, self.cache)
        self.positions = self.positions + 1
        return self._choose(logits, range(len(self)))

    def drop_ended(self) -> list[tuple[int, Completion]]:
        """Remove the rows that ended (or were cancelled); returns them with their rows before."""
        ended = [(row, completion) for row, completion in enumerate(self.completions) if not completion.active]
        if not ended:
            return []
        kept = [row for row, completion in enumerate(self.completions) if completion.active]
        self.completions = [self.completions[row] for row in kept]
        if not kept:
            self.cache = None
            self.attention_mask = self.attention_mask[:0, :0]
            self.positions, self.next_ids = self.positions[:0], self.next_ids[:0]
            return ended
        index = torch.tensor(kept, device=self.device)
        assert self.cache is not None
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.positions, self.next_ids = self.positions[index], self.next_ids[index]
        # columns no remaining row attends to (the padding of longer prompts that left) go too
        first = int(self.attention_mask.any(0).int().argmax())
        if first and self.takes_newcomers:
            for layer in _key_value_layers(self.cache):
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.attention_mask = self.attention_mask[:, first:]
        return ended

    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """The float32 logits of each row's last position."""
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :].float().cpu()

    def _choose(self, logits: torch.Tensor, rows: range) -> list[tuple[int, str]]:
        """Each row's next token from its logits (rows that ended take padding); (row, released
        text) for each row that was still decoding."""
        chosen, released = [], []
        for index, row in enumerate(rows):
            completion = self.completions[row]
            token = self.pad_id
            if completion.active:
                token = completion.choose(logits[index])
                released.append((row, completion.add(token)))
            chosen.append(token)
        new_ids = torch.tensor(chosen, dtype=torch.long, device=self.device)[:, None]
        self.next_ids = torch.cat([self.next_ids[: rows.start], new_ids])
        return released

    def _append_rows(self, cache: DynamicCache, attention_mask: torch.Tensor) -> torch.Tensor:
        """Append `cache`'s rows to the batch's, both left-padded to the longer; returns the mask."""
        assert self.cache is not None
        width = max(self.attention_mask.shape[1], attention_mask.shape[1])
        for mine, theirs in zip(_key_value_layers(self.cache), _key_value_layers(cache)):
            mine.keys = torch.cat([_left_padded(mine.keys, width, -2), _left_padded(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_padded(mine.values, width, -2), _left_padded(theirs.values, width, -2)])
        return torch.cat([_left_padded(self.attention_mask, width, -1), _left_padded(attention_mask, width, -1)])


def _key_value_layers(cache: DynamicCache) -> list[Any]:
    """The layers of a cache `takes_newcomers` accepted: plain `keys` and `values` tensors, [batch,
    heads, tokens, head size] (transformers types a cache's layers as a union of every kind)."""
    return list(cache.layers)


def _left_padded(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros before its entries along `dim` (-1 or -2) up to `width`."""
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    return torch.nn.functional.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0))
