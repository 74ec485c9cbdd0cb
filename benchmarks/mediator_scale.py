"""Peak memory of `mergewise mediator build` on a ~0.9 B-parameter bf16 Llama, and at twice its depth.

Workload: a random bf16 Llama (hidden 2048, 16 layers, intermediate 5632, vocabulary 32000, 32 heads
with 4 KV heads, untied lm_head) and three noisy experts of it: base + seeded gaussian noise on every
weight, four times stronger on every third decoder layer (a different third per expert), so the
experts conflict more in some units than in others. Each model is written tensor by tensor as
sharded safetensors with an index (the generator holds one tensor and one shard), with the char-level
zoo tokenizer (its vocabulary is smaller than the model's: only the router's prompts are tokenised).
Every expert has 24 calibration prompts drawn from a word list of its own. All of it is cached under
--work.

`mergewise mediator analyze` and `mergewise mediator build` (linear merge, default memory budget) run
as measured child processes (wall time and peak RSS: `common.run_measured`). Target: build
peak ≤ 0.5 × one model's bytes, and flat when the depth doubles. Writes
benchmarks/results/mediator_scale.md.

    python benchmarks/mediator_scale.py                    # 16 and 32 layers (~0.9 B and ~1.7 B parameters)
    python benchmarks/mediator_scale.py --hidden 256 --layers 2 --intermediate 512 --vocab 2000   # smoke test
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from common import RESULTS, WORK, Measured, mergewise_command, run_measured, write_report
from workloads import LlamaShape, llama_config, llama_tensors, parameter_count, write_sharded

from mergewise.plan import layer_index
from mergewise.zoo.tokenizer import build_char_tokenizer

TARGET_RATIO = 0.5  # build peak RSS / one model's bytes
NOISE = 0.002  # std of an expert's update, a tenth of the base weights' (0.02)
OWN_LAYER_GAIN = 4  # an expert's update on its own layers (layer ≡ expert index mod experts)
PROMPTS_PER_EXPERT = 24
COMMON_WORDS = "the a of to and with then in on for is it this that".split()
TOPICS = {
    "arithmetic": "add sum plus minus number seven twelve digits total carry multiply divide equals remainder "
    "fraction count double half square root".split(),
    "cooking": "bake flour sugar butter oven simmer garlic onion salt pepper stir dough recipe spoon boil "
    "roast sauce bread knead taste".split(),
    "sailing": "boat sail wind harbor anchor tide mast rope deck storm wave port starboard keel compass "
    "current island crew knot shore".split(),
}


def noisy_tensors(shape: LlamaShape, seed: int, expert: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors (regenerated from `seed`) plus expert `expert`'s seeded noise, one at a time."""
    generator = torch.Generator().manual_seed(seed + 1 + expert)
    for name, tensor in llama_tensors(shape, torch.Generator().manual_seed(seed)):
        layer = layer_index(name)
        gain = OWN_LAYER_GAIN if layer is not None and layer % len(TOPICS) == expert else 1
        noisy = torch.randn(tensor.shape, generator=generator).mul_(NOISE * gain).add_(tensor)
        yield name, noisy.to(torch.bfloat16)


def write_model(folder: Path, shape: LlamaShape, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    folder.mkdir(parents=True)
    llama_config(shape).save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    write_sharded(tensors, folder)


def write_prompts(path: Path, words: list[str], generator: random.Random) -> None:
    """One prompt a line, mostly the topic's words: the router can tell the experts apart by them."""
    lines = []
    for _ in range(PROMPTS_PER_EXPERT):
        length = generator.randint(10, 16)
        lines.append(
            " ".join(generator.choice(words if generator.random() < 0.7 else COMMON_WORDS) for _ in range(length))
        )
    path.write_text("\n".join(lines) + "\n")


def build_workload(work: Path, shape: LlamaShape, seed: int) -> Path:
    """Base, experts, prompts and the Mediator recipe for `shape` (built once); returns the folder."""
    root = work / (
        f"mediator-h{shape.hidden}-l{shape.layers}-i{shape.intermediate}-v{shape.vocab}"
        f"-a{shape.heads}-k{shape.kv_heads}-s{seed}"
    )
    if (root / "COMPLETE").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    print(f"building workload in {root} ...", flush=True)
    started = time.perf_counter()
    write_model(root / "base", shape, llama_tensors(shape, torch.Generator().manual_seed(seed)))
    (root / "prompts").mkdir()
    words = random.Random(seed)
    experts = []
    for index, (task, vocabulary) in enumerate(TOPICS.items()):
        write_model(root / f"expert-{task}", shape, noisy_tensors(shape, seed, index))
        write_prompts(root / "prompts" / f"{task}.txt", vocabulary, words)
        experts.append({"model": f"expert-{task}", "task": task, "prompts": f"prompts/{task}.txt"})
    recipe = {"merge_method": "linear", "base_model": "base", "dtype": "bfloat16", "mediator": {"experts": experts}}
    (root / "recipe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (root / "COMPLETE").touch()
    print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    return root


def measure(workload: Path, args: argparse.Namespace) -> dict[str, Measured]:
    """The analysis and the build, each its own measured child."""
    recipe = str(workload / "recipe.yml")
    threads = ["--threads", str(args.threads)] if args.threads is not None else []
    runs = workload / "runs"
    measured = {
        "analyze": run_measured(
            mergewise_command("mediator", "analyze", recipe, str(runs / "analysis"), "--overwrite", "--quiet")
        ),
        "build": run_measured(
            mergewise_command("mediator", "build", recipe, str(runs / "mediator"), "--overwrite", "--quiet", *threads)
        ),
    }
    shutil.rmtree(runs / "mediator")  # a model and more of disk, kept by no one
    return measured


def model_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def report_table(rows: list[tuple[LlamaShape, int, dict[str, Measured]]]) -> str:
    lines = [
        "| layers | parameters (M) | one model (MiB) | step | peak RSS (MiB) | peak / one model | wall s |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for shape, size, measured in rows:
        for step, run in measured.items():
            lines.append(
                f"| {shape.layers} | {parameter_count(shape) / 1e6:.0f} | {size / 2**20:.0f} | {step} | "
                f"{run.peak_rss_mib:.0f} | {run.peak_rss_mib * 2**20 / size:.3f} | {run.wall_s:.1f} |"
            )
    (_, shallow_size, shallow), (_, deep_size, deep) = rows
    worst = max(measured["build"].peak_rss_mib * 2**20 / size for _, size, measured in rows)
    growth = deep["build"].peak_rss_mib / shallow["build"].peak_rss_mib
    lines += [
        "",
        f"Build peak / one model: at most **{worst:.3f}×** (target ≤ {TARGET_RATIO}×: "
        f"{'met' if worst <= TARGET_RATIO else 'missed'}). Doubling the depth grows the model "
        f"{deep_size / shallow_size:.2f}× and the build's peak RSS **{growth:.2f}×** "
        f"(analysis: {deep['analyze'].peak_rss_mib / shallow['analyze'].peak_rss_mib:.2f}×).",
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16, help="depth of the first run; the second doubles it")
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="--threads of the build (default: all cores)")
    parser.add_argument("--work", type=Path, default=WORK, help="cache of the workloads")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where mediator_scale.md goes")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rows = []
    for layers in (args.layers, 2 * args.layers):
        shape = LlamaShape(
            hidden=args.hidden,
            layers=layers,
            intermediate=args.intermediate,
            vocab=args.vocab,
            heads=args.heads,
            kv_heads=args.kv_heads,
        )
        workload = build_workload(args.work, shape, args.seed)
        rows.append((shape, model_bytes(workload / "base"), measure(workload, args)))
    title = (
        f"Mediator build memory: random bf16 Llama, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"vocabulary {args.vocab}, 3 experts"
    )
    write_report(args.results / "mediator_scale.md", title, report_table(rows), args.threads)


if __name__ == "__main__":
    main()
