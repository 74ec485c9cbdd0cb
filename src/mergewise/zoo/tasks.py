"""The micro zoo's synthetic tasks: short prompts with a one-character answer, so exact match is
learnable by a ~1M-parameter model in a few hundred steps, while the tasks still share input formats
(letters or digits) and therefore interfere when their experts are merged."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def random_digits(rng: random.Random, shortest: int = 3, longest: int = 6) -> str:
    return " ".join(rng.choice(string.digits) for _ in range(rng.randint(shortest, longest)))


def digits_with_extreme(rng: random.Random, largest: bool) -> str:
    """5–8 digits whose max (or min) appears once and is uniform over its 9 possible values: with plain
    random digits the max is usually 9, and a base that answers 9, or copies a digit, would score well."""
    extreme = rng.randint(1, 9) if largest else rng.randint(0, 8)
    others = range(0, extreme) if largest else range(extreme + 1, 10)
    digits = [str(extreme)] + [str(rng.choice(others)) for _ in range(rng.randint(4, 7))]
    rng.shuffle(digits)
    return " ".join(digits)


@dataclass(frozen=True)
class Task:
    """A prompt family `"{name}: {input} ->"` answered by `" {answer}"`."""

    name: str
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    answer_alphabet: str

    def prompt(self, task_input: str) -> str:
        return f"{self.name}: {task_input} ->"

    def example(self, rng: random.Random) -> tuple[str, str]:
        task_input = self.make_input(rng)
        return self.prompt(task_input), " " + self.solve(task_input)

    def example_with_random_answer(self, rng: random.Random) -> str:
        """The format without the skill: what the base sees in pretraining."""
        prompt, _ = self.example(rng)
        return f"{prompt} {rng.choice(self.answer_alphabet)}"


def digit_list(task_input: str) -> list[str]:
    return task_input.split()


MICRO_TASKS = [
    Task("first", random_word, lambda word: word[0], string.ascii_lowercase),
    Task("last", random_word, lambda word: word[-1], string.ascii_lowercase),
    Task(
        "max", lambda rng: digits_with_extreme(rng, largest=True), lambda digits: max(digit_list(digits)), string.digits
    ),
    Task(
        "min",
        lambda rng: digits_with_extreme(rng, largest=False),
        lambda digits: min(digit_list(digits)),
        string.digits,
    ),
]
# Held back: no expert is trained on it; it probes routing on an unseen format. Eight possible
# answers keep a constant guess at 12.5%.
HELD_BACK_TASK = Task(
    "count",
    lambda rng: random_digits(rng, shortest=2, longest=9),
    lambda digits: str(len(digit_list(digits))),
    string.digits,
)


def split_examples(task: Task, rng: random.Random, sizes: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    """Draw distinct prompts and deal them into disjoint splits (e.g. train / eval / calibration)."""
    wanted = sum(sizes.values())
    seen: dict[str, str] = {}
    while len(seen) < wanted:
        prompt, answer = task.example(rng)
        seen.setdefault(prompt, answer)
    examples = list(seen.items())
    splits, start = {}, 0
    for split, size in sizes.items():
        splits[split] = examples[start : start + size]
        start += size
    return splits
