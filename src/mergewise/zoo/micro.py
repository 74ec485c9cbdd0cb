"""The micro zoo (and its `tiny` test-sized sibling): a char-level Llama pretrained on stdlib source
plus task formats with random answers, and one answer-only full fine-tune per task."""

from __future__ import annotations

import random
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mergewise.evaluate.loading import load_model
from mergewise.evaluate.zoo_eval import score_task
from mergewise.zoo.building import (
    build_model_once,
    derived_seed,
    library_versions,
    open_manifest,
    task_vector_ratio,
    write_eval_jsonl,
    write_example_configs,
    write_lines,
)
from mergewise.zoo.corpus import stdlib_text_split
from mergewise.zoo.manifest import load_zoo, write_manifest_dict
from mergewise.zoo.scales import BASE_CEILING, EXPERT_TARGET, MICRO_SCALES, MicroScale
from mergewise.zoo.tasks import HELD_BACK_TASK, MICRO_TASKS, Task, split_examples
from mergewise.zoo.tokenizer import build_char_tokenizer
from mergewise.zoo.training import answer_only_batches, pretraining_batches, run_training


def build_micro_zoo(zoo_dir: Path, size: str, seed: int) -> dict:
    """Build (or finish) a micro-family zoo in `zoo_dir`; returns its zoo.json content."""
    scale = MICRO_SCALES[size]
    manifest = open_manifest(zoo_dir, size, seed)
    tokenizer = build_char_tokenizer()
    general_train, general_eval = stdlib_text_split(scale.general_train_chars, scale.general_eval_chars)
    write_lines(zoo_dir / "general" / "eval.txt", [general_eval])
    all_tasks = [*MICRO_TASKS, HELD_BACK_TASK]
    train_sets = {task.name: write_task_files(zoo_dir, task, scale, seed) for task in all_tasks}

    train_base = partial(pretrain_base, tokenizer, general_train, all_tasks, scale, derived_seed(seed, "base"))
    if build_model_once(zoo_dir, manifest, "base", train_base):
        # A new base invalidates experts fine-tuned from an older one.
        manifest["models"] = {"base": manifest["models"]["base"]}
    base = LlamaForCausalLM.from_pretrained(zoo_dir / "base", dtype=torch.float32, trust_remote_code=False)
    rebuilt = False
    for task in MICRO_TASKS:
        name = f"expert-{task.name}"
        train_expert = partial(
            finetune_expert, base, tokenizer, train_sets[task.name], scale, derived_seed(seed, name), name
        )
        rebuilt |= build_model_once(zoo_dir, manifest, name, train_expert)
    manifest.update(describe_zoo(zoo_dir, scale, all_tasks, train_sets))
    write_manifest_dict(zoo_dir, manifest)
    if rebuilt or "scores" not in manifest:
        manifest.update(score_zoo_models(zoo_dir))
        write_manifest_dict(zoo_dir, manifest)
    return manifest


def score_zoo_models(zoo_dir: Path) -> dict:
    """Exact match of the base and of every expert on every task's held-out set, and whether the
    zoo's targets hold: each expert ≥ 90 % on its own task, the base ≤ 20 % on every task."""
    zoo = load_zoo(zoo_dir)
    experts = {name: f"expert-{name}" for name, task in zoo.tasks.items() if task.expert}
    scores = {}
    for model in ["base", *experts.values()]:
        loaded = load_model(zoo_dir / model)
        scores[model] = {name: score_task(loaded, zoo, name, 64, None)["score"] for name in zoo.tasks}
    met = all(scores[expert][name] >= EXPERT_TARGET for name, expert in experts.items()) and all(
        score <= BASE_CEILING for score in scores["base"].values()
    )
    return {
        "scores": scores,
        "targets": {"expert_on_own_task_min": EXPERT_TARGET, "base_max": BASE_CEILING, "met": met},
    }


def write_task_files(zoo_dir: Path, task: Task, scale: MicroScale, seed: int) -> list[tuple[str, str]]:
    """Write the eval and calibration files; return the (disjoint) training examples."""
    splits = split_examples(
        task,
        random.Random(derived_seed(seed, f"data-{task.name}")),
        {"eval": scale.eval_examples, "calibration": scale.calibration_examples, "train": scale.train_examples},
    )
    write_eval_jsonl(zoo_dir / "tasks" / task.name / "eval.jsonl", splits["eval"])
    write_lines(zoo_dir / "tasks" / task.name / "calib.txt", [prompt for prompt, _ in splits["calibration"]])
    return splits["train"]


def pretrain_base(tokenizer: PreTrainedTokenizerBase, text: str, tasks: list[Task], scale: MicroScale, seed: int):
    torch.manual_seed(seed)  # in build_model_once's fork of the random stream
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=scale.hidden_size,
        intermediate_size=scale.intermediate_size,
        num_hidden_layers=scale.layers,
        num_attention_heads=scale.heads,
        num_key_value_heads=scale.heads,
        max_position_embeddings=scale.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    rng = random.Random(seed)
    batches = pretraining_batches(
        tokenizer,
        text,
        lambda line_rng: line_rng.choice(tasks).example_with_random_answer(line_rng),
        scale.task_share,
        scale.pretrain.batch_size,
        scale.pretrain_sequence_length,
        rng,
    )
    result = run_training(model, batches, scale.pretrain, "base")
    record = {
        "seed": seed,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "train_chars": len(text),
        "final_loss": result.final_loss,
        "loss_curve": result.loss_curve,
    }
    return model, tokenizer, record


def finetune_expert(base, tokenizer, examples: list[tuple[str, str]], scale: MicroScale, seed: int, name: str):
    torch.manual_seed(seed)  # in build_model_once's fork of the random stream
    model = LlamaForCausalLM(base.config)
    model.load_state_dict(base.state_dict())
    batches = answer_only_batches(tokenizer, examples, scale.finetune.batch_size, random.Random(seed))
    result = run_training(model, batches, scale.finetune, name)
    record = {
        "seed": seed,
        "final_loss": result.final_loss,
        "loss_curve": result.loss_curve,
        "task_vector_norm_ratio": task_vector_ratio(base, model),
    }
    return model, tokenizer, record


def describe_zoo(zoo_dir: Path, scale: MicroScale, tasks: list[Task], train_sets: dict) -> dict:
    """The contract part of zoo.json (what zoo/manifest.py reads), plus data sizes, schedules and versions."""
    experts = {task.name: f"expert-{task.name}" for task in MICRO_TASKS}
    return {
        "base": "base",
        "tasks": {
            task.name: {
                "expert": experts.get(task.name),
                "calibration": f"tasks/{task.name}/calib.txt",
                "eval": f"tasks/{task.name}/eval.jsonl",
                "metric": "exact_match",
                "prompt_format": task.prompt("<input>") + " <answer>",
                "data": {
                    "train": len(train_sets[task.name]),
                    "eval": scale.eval_examples,
                    "calibration": scale.calibration_examples,
                },
            }
            for task in tasks
        },
        "general": {
            "eval": "general/eval.txt",
            "metric": "nll",
            "source": "python stdlib *.py, every 10th file held out",
        },
        "training": asdict(scale),
        "configs": write_example_configs(zoo_dir, "base", list(experts.values()), "float32"),
        "versions": library_versions(),
    }
