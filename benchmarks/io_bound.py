"""TIES on a ~0.9 B-parameter model against the time it takes just to read its inputs and write one
model's bytes, measured in the same run with the page cache warm.

Workload: a random bf16 Llama of ~0.9 B parameters (hidden 2048, 16 layers, intermediate 5632,
vocabulary 32000, 32 heads, 8 KV heads) and three fine-tunes, cached like W1. The limit of a round is
`cat` of every input file to /dev/null plus `cp` of the base's files and `sync` of the copies (the
merge flushes its output to disk too). Rounds take turns; the inputs are read once before the first.

    python benchmarks/io_bound.py                  # 3 rounds, ~0.9 B
    python benchmarks/io_bound.py --repeats 1 --hidden 1024 --layers 4
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import yaml
from common import RESULTS, WORK, mergewise_command, run_measured, write_report
from workloads import NUM_FINE_TUNES, LlamaShape, build_workload, parameter_count


def read_and_write(inputs: list[Path], model: Path, copy: Path) -> float:
    """Seconds to read `inputs` and write `model`'s files to `copy`, flushed to disk."""
    shutil.rmtree(copy, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)
    subprocess.run(["cp", "-r", str(model), str(copy)], check=True)
    subprocess.run(["sync", *map(str, sorted(copy.iterdir()))], check=True)
    elapsed = time.perf_counter() - start
    shutil.rmtree(copy)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--workdir", type=Path, default=WORK)
    parser.add_argument("--report", default="io_bound.md")
    args = parser.parse_args()
    shape = LlamaShape(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=32, kv_heads=8)
    folder = build_workload(args.workdir, shape)
    models = [folder / "base", *(folder / f"ft{index}" for index in range(1, NUM_FINE_TUNES + 1))]
    inputs = sorted(path for model in models for path in model.glob("*.safetensors"))
    runs = args.workdir / "runs" / "io-bound"
    runs.mkdir(parents=True, exist_ok=True)
    recipe = runs / f"ties-h{args.hidden}-l{args.layers}.yml"
    fine_tunes = [{"model": str(model), "parameters": {"weight": 1 / 3, "density": 0.5}} for model in models[1:]]
    recipe.write_text(
        yaml.safe_dump(
            {"merge_method": "ties", "base_model": str(models[0]), "models": fine_tunes, "dtype": "bfloat16"}
        )
    )
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)  # the page cache warm
    limits, merges, peaks = [], [], []
    for round_ in range(args.repeats):
        limits.append(read_and_write(inputs, models[0], runs / "copy"))
        out = runs / "merged"
        shutil.rmtree(out, ignore_errors=True)
        measured = run_measured(mergewise_command("merge", str(recipe), str(out), "--quiet"))
        shutil.rmtree(out)
        merges.append(measured.wall_s)
        peaks.append(measured.peak_rss_mib)
        print(f"round {round_ + 1}: read + write {limits[-1]:.1f} s, ties {merges[-1]:.1f} s", flush=True)
    limit, merge = statistics.median(limits), statistics.median(merges)
    read_bytes = sum(path.stat().st_size for path in inputs)
    body = "\n".join(
        [
            f"{parameter_count(shape) / 1e9:.2f} B parameters (hidden {shape.hidden}, {shape.layers} layers, "
            f"vocabulary {shape.vocab}), base + {NUM_FINE_TUNES} fine-tunes: {read_bytes / 1e9:.1f} GB read, "
            f"{sum(path.stat().st_size for path in models[0].glob('*.safetensors')) / 1e9:.1f} GB written; "
            f"page cache warm; medians of {args.repeats} rounds taking turns.",
            "",
            "| run | wall s (median) | range | peak RSS MiB |",
            "|---|---:|---:|---:|",
            f"| `cat` inputs + `cp` + `sync` one model | {limit:.1f} | {min(limits):.1f}–{max(limits):.1f} | |",
            f"| `mergewise merge` ties | {merge:.1f} | {min(merges):.1f}–{max(merges):.1f} | "
            f"{statistics.median(peaks):.0f} |",
            "",
            f"ties / read + write: **{merge / limit:.2f}×** (target ≤ 1.5×)",
        ]
    )
    write_report(RESULTS / args.report, "TIES at ~0.9 B against reading its inputs and writing one model", body, None)


if __name__ == "__main__":
    main()
