"""The micro zoo's quality targets (zoo.md): slow, it builds the real micro zoo (minutes on 2 cores).

Set MERGEWISE_MICRO_ZOO=DIR to check an existing build instead of building one in a temp folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergewise.evaluate import evaluate_model
from mergewise.zoo import build_zoo, load_zoo

pytestmark = [pytest.mark.slow, pytest.mark.integration]
BUILD_BUDGET_SECONDS = 300


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory) -> Path:
    existing = os.environ.get("MERGEWISE_MICRO_ZOO")
    if existing:
        return Path(existing)
    zoo_dir = tmp_path_factory.mktemp("micro-zoo")
    started = time.perf_counter()
    build_zoo(zoo_dir, "micro", seed=0)
    elapsed = time.perf_counter() - started
    assert elapsed <= BUILD_BUDGET_SECONDS * 1.2, f"micro build took {elapsed:.0f} s (budget {BUILD_BUDGET_SECONDS} s)"
    return zoo_dir


def exact_match(model_dir: Path, zoo_dir: Path) -> dict[str, float]:
    results = evaluate_model(model_dir, zoo_dir, batch_size=100)
    return {name: entry["score"] for name, entry in results["tasks"].items()}


def average_of_experts(zoo_dir: Path, out_dir: Path) -> Path:
    """A uniform weight average of the experts, computed directly (independent of the merge engine)."""
    zoo = load_zoo(zoo_dir)
    experts = [task.expert for task in zoo.tasks.values() if task.expert is not None]
    states = [AutoModelForCausalLM.from_pretrained(path).state_dict() for path in experts]
    merged = AutoModelForCausalLM.from_pretrained(experts[0])
    merged.load_state_dict({key: torch.stack([state[key] for state in states]).mean(0) for key in states[0]})
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(experts[0]).save_pretrained(out_dir)
    return out_dir


def test_micro_targets(micro_zoo, tmp_path):
    zoo = load_zoo(micro_zoo)
    base_scores = exact_match(zoo.base, micro_zoo)
    assert all(score <= 0.20 for score in base_scores.values()), base_scores
    expert_scores = {}
    for name, task in zoo.tasks.items():
        if task.expert is not None:
            expert_scores[name] = exact_match(task.expert, micro_zoo)[name]
    assert all(score >= 0.90 for score in expert_scores.values()), expert_scores

    averaged = exact_match(average_of_experts(micro_zoo, tmp_path / "average"), micro_zoo)
    mean_expert = sum(expert_scores.values()) / len(expert_scores)
    mean_average = sum(averaged[name] for name in expert_scores) / len(expert_scores)
    assert mean_average <= mean_expert - 0.10, (averaged, expert_scores)
