"""Seeded CPU training loops for the zoo: causal-LM pretraining and answer-only fine-tuning."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 20
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainingResult:
    final_loss: float
    loss_curve: list[float]  # mean loss over consecutive windows of steps, for zoo.json


def run_training(
    model: PreTrainedModel,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    schedule: Schedule,
    description: str,
    curve_points: int = 10,
) -> TrainingResult:
    """AdamW with linear warm-up and cosine decay; returns the loss over the last tenth of training."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, schedule))
    model.train()
    losses: list[float] = []
    with tqdm(range(schedule.steps), desc=description, unit="step", leave=False) as progress:
        for _ in progress:
            input_ids, labels = next(batches)
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    window = max(1, len(losses) // curve_points)
    curve = [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 4) for i in range(0, len(losses), window)]
    tail = losses[-window:]
    return TrainingResult(final_loss=round(sum(tail) / len(tail), 4), loss_curve=curve)


def learning_rate_factor(step: int, schedule: Schedule) -> float:
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretraining_batches(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    make_task_line: Callable[[random.Random], str],
    task_share: float,
    batch_size: int,
    sequence_length: int,
    rng: random.Random,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rows of `<s>` + either a random crop of general text or packed task lines (`task_share` of rows)."""
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body_length = sequence_length - 1
    while True:
        rows = []
        for _ in range(batch_size):
            if rng.random() < task_share:
                lines = ""
                while len(lines) < body_length:
                    lines += make_task_line(rng) + "\n"
                body = tokenizer(lines, add_special_tokens=False)["input_ids"][:body_length]
            else:
                start = rng.randrange(len(text_ids) - body_length)
                body = text_ids[start : start + body_length]
            rows.append([tokenizer.bos_token_id, *body])
        input_ids = torch.tensor(rows)
        yield input_ids, input_ids.clone()


def answer_only_batches(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[str, str]],
    batch_size: int,
    rng: random.Random,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`<s>prompt answer\\n` rows (cut at `max_tokens`), loss on the answer and its newline only: the
    expert learns the skill, not the prompt distribution, which keeps its task vector small."""
    while True:
        rows = [encode_example(tokenizer, *rng.choice(examples), max_tokens) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), IGNORE_INDEX)
        for row, (ids, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
        yield input_ids, labels


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, max_tokens: int | None = None
) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer + "\n", add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + answer_ids)[:max_tokens]
    return input_ids, ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_tokens]
