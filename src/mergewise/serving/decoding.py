"""Batched, token-by-token decoding with per-sequence sampling and stopping.

transformers' `generate` takes one generation config per batch; a server's batch mixes requests that
each ask for their own length, temperature, nucleus, seed and stop strings, that stream their text
as it comes and that a client may abandon. So the batch is decoded here a token at a time: one
prefill of the left-padded prompts, then one forward per step with the cache, each sequence choosing
its token from the float32 logits of its own row (greedy is the arg-max, as `generate`'s is) and
ending on its own; the batch ends when every sequence has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

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


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    completions: Sequence[Completion],
    pad_id: int,
    device: torch.device,
    on_text: Callable[[int, str], object] | None = None,
) -> None:
    """Decode every completion to its end, in one batch. `on_text(index, text)` is called with the
    text each step releases (also ""), after every step, so a caller can stream and cancel."""
    width = max(len(completion.prompt_ids) for completion in completions)
    input_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, completion in enumerate(completions):
        input_ids[row, width - len(completion.prompt_ids) :] = torch.tensor(completion.prompt_ids)
        attention_mask[row, width - len(completion.prompt_ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    while True:
        logits = (
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1, :]
            .float()
            .cpu()
        )
        chosen = []
        for row, completion in enumerate(completions):
            if completion.active:
                token = completion.choose(logits[row])
                released = completion.add(token)
                if on_text is not None:
                    on_text(row, released)
            else:
                token = pad_id
            chosen.append(token)
        if not any(completion.active for completion in completions):
            return
        input_ids = torch.tensor(chosen, device=device)[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(completions), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
