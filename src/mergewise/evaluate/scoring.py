"""Batched scorers: greedy exact match and teacher-forced NLL, on any device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from mergewise.checkpoint.tokens import start_token_id
from mergewise.evaluate.loading import LoadedModel


@dataclass(frozen=True)
class NllTotal:
    """Summed negative log-likelihood (nats) over `tokens` predicted tokens."""

    nll: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.nll / max(1, self.tokens)


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def continuation_log_likelihoods(
    loaded: LoadedModel, pairs: Sequence[tuple[str, str]], batch_size: int, max_length: int | None = None
) -> list[tuple[float, bool, int]]:
    """For each (context, continuation): summed log-probability of the continuation, whether greedy
    decoding would produce exactly it token by token, and its token count."""
    encoded = [encode_pair(loaded, context, continuation, max_length) for context, continuation in pairs]
    results = []
    for batch in chunks(encoded, batch_size):
        results.extend(score_encoded(loaded, list(batch)))
    return results


def encode_pair(
    loaded: LoadedModel, context: str, continuation: str, max_length: int | None
) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, encoded separately so the continuation's tokens are
    exactly the ones scored. An empty context becomes the start token; an over-long one loses its
    oldest tokens."""
    tokenizer = loaded.tokenizer
    context_ids = tokenizer(context)["input_ids"] or [start_token_id(loaded.tokenizer)]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if max_length is not None:
        context_ids = context_ids[-max(1, max_length - len(continuation_ids)) :]
    return context_ids, continuation_ids


@torch.no_grad()
def score_encoded(loaded: LoadedModel, encoded: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool, int]]:
    """One right-padded forward pass over token-id pairs (context, continuation)."""
    results: dict[int, tuple[float, bool, int]] = {}
    for rows, weights in loaded.route_groups([context for context, _ in encoded]):
        group = [encoded[row] for row in rows]
        sequences = [context + continuation for context, continuation in group]
        input_ids, attention_mask = right_pad(sequences, loaded.tokenizer.pad_token_id, loaded.device)
        with weights:
            logits = loaded.model(input_ids=input_ids, attention_mask=attention_mask).logits
        log_probs = torch.log_softmax(logits.float(), -1)
        for position, (row, (context, continuation)) in enumerate(zip(rows, group)):
            steps = torch.arange(len(context) - 1, len(context) + len(continuation) - 1, device=loaded.device)
            targets = torch.tensor(continuation, device=loaded.device)
            row_log_probs = log_probs[position, steps]
            total = row_log_probs.gather(-1, targets[:, None]).sum().item()
            greedy = bool((row_log_probs.argmax(-1) == targets).all().item())
            results[row] = (total, greedy, len(continuation))
    return [results[row] for row in range(len(encoded))]


def right_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, device=device)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, device=device)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def greedy_completions(
    loaded: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    stop: Sequence[str] = ("\n",),
    max_length: int | None = None,
) -> list[str]:
    """Greedy continuations, left-padded in batches, each cut at the first stop string; prompts longer
    than `max_length - max_new_tokens` tokens keep their most recent tokens."""
    tokenizer = loaded.tokenizer
    keep = max_length - max_new_tokens if max_length and max_length > max_new_tokens else 0  # [-0:] keeps all
    completions = []
    for batch in chunks(prompts, batch_size):
        encoded = [(tokenizer(prompt)["input_ids"] or [start_token_id(loaded.tokenizer)])[-keep:] for prompt in batch]
        texts: list[str] = [""] * len(encoded)
        for rows, weights in loaded.route_groups(encoded):
            group = [encoded[row] for row in rows]
            width = max(len(ids) for ids in group)
            input_ids = torch.full((len(group), width), tokenizer.pad_token_id, device=loaded.device)
            attention_mask = torch.zeros((len(group), width), dtype=torch.long, device=loaded.device)
            for position, ids in enumerate(group):
                input_ids[position, width - len(ids) :] = torch.tensor(ids, device=loaded.device)
                attention_mask[position, width - len(ids) :] = 1
            with weights:
                # generate() is GenerationMixin's, which torch's types of PreTrainedModel do not show
                generated = loaded.model.generate(  # type: ignore[operator]
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            for row, new_tokens in zip(rows, generated[:, width:]):
                text = cast(str, tokenizer.decode(new_tokens, skip_special_tokens=True))  # one sequence: one str
                texts[row] = cut_at_stop(text, stop)
        completions.extend(texts)
    return completions


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(marker) for marker in stop if marker in text), default=len(text))
    return text[:cut]


def exact_match(completion: str, answer: str) -> bool:
    """Whitespace around the answer is formatting, not content."""
    return completion.strip() == answer.strip()


@torch.no_grad()
def text_nll(loaded: LoadedModel, text: str, window: int, batch_size: int, max_windows: int | None = None) -> NllTotal:
    """Per-token NLL of `text` in non-overlapping windows, each read after a fresh start token."""
    token_ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [token_ids[start : start + window] for start in range(0, len(token_ids), window)]
    encoded = [([start_token_id(loaded.tokenizer)], ids) for ids in windows[:max_windows]]
    total = NllTotal(0.0, 0)
    for batch in chunks(encoded, batch_size):
        for log_likelihood, _, count in score_encoded(loaded, list(batch)):
            total = NllTotal(total.nll - log_likelihood, total.tokens + count)
    return total
