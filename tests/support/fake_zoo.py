"""A zoo folder that honours zoo.json's contract without training anything: random tiny models and
real task files. For tests that need a zoo's paths and files (recipes, search files, manifests),
not models that learned their tasks; those use the trained tiny zoo (the `tiny_zoo` fixture)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mergewise.zoo.building import write_eval_jsonl, write_lines
from mergewise.zoo.tasks import HELD_BACK_TASK, MICRO_TASKS, split_examples
from tests.support.tiny_models import build_fine_tune, build_tiny_model

EXAMPLES = {"eval": 16, "calibration": 16}


def build_fake_zoo(zoo_dir: Path, seed: int = 0) -> Path:
    """`zoo_dir` with `base`, one `expert-TASK` per micro task (the base plus noise), each task's
    eval and calibration files, the general text and zoo.json."""
    build_tiny_model("llama", zoo_dir / "base", seed=seed)
    tasks = {}
    for task in [*MICRO_TASKS, HELD_BACK_TASK]:
        expert = None
        if task in MICRO_TASKS:
            expert = f"expert-{task.name}"
            build_fine_tune(zoo_dir / "base", zoo_dir / expert, seed=seed + len(tasks) + 1, noise=0.05)
        splits = split_examples(task, random.Random(f"{seed}-{task.name}"), EXAMPLES)
        write_eval_jsonl(zoo_dir / "tasks" / task.name / "eval.jsonl", splits["eval"])
        write_lines(zoo_dir / "tasks" / task.name / "calib.txt", [prompt for prompt, _ in splits["calibration"]])
        tasks[task.name] = {
            "expert": expert,
            "calibration": f"tasks/{task.name}/calib.txt",
            "eval": f"tasks/{task.name}/eval.jsonl",
            "metric": "exact_match",
        }
    write_lines(zoo_dir / "general" / "eval.txt", ["def add(a, b):\n    return a + b\n"])
    manifest = {"base": "base", "tasks": tasks, "general": {"eval": "general/eval.txt", "metric": "nll"}}
    (zoo_dir / "zoo.json").write_text(json.dumps(manifest, indent=2))
    return zoo_dir
