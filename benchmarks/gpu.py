"""mergewise's GPU paths, timed side by side with the CPU and with mergekit's `--cuda`, in one table.

    python benchmarks/gpu.py --zoo /path/to/zoo-micro                  # on a CUDA machine
    python benchmarks/gpu.py --zoo /path/to/zoo-micro --device cpu --layers 2 --repeats 1   # a dry run

Each row runs a whole command as its own child process (wall time and peak RSS of its process tree):
- merge `ties`, `task_arithmetic` and `della` on W1 (the bf16 Llama of `vs_mergekit.py`; `--layers`
  makes it shallower): `mergewise merge --device DEVICE`, `mergewise merge --device cpu` and
  `mergekit-yaml --cuda`. The DEVICE output must equal the CPU output tensor by tensor (the
  selections and DELLA's draws run on the CPU for every device; the arithmetic rounds the same).
- AIM: `mergewise calibrate --data self` of the zoo's base on DEVICE and on the CPU.
- Mediator: `mergewise mediator build` of the zoo at default settings, bf16, on DEVICE and on the CPU.
- Serving: that Mediator folder under `mergewise serve --device DEVICE` and `--device cpu`, the
  zoo's held-out prompts of every task interleaved, streamed by `--concurrency` async `openai`
  clients: requests/s, tokens/s, p50/p99 latency.

Writes benchmarks/results/gpu-<card>.md, naming the card (`torch.cuda.get_device_name`), or
gpu-cpu.md for a dry run. Needs `mergekit-yaml` for the mergekit rows (skipped without it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from common import RESULTS, WORK, Measured, PeakRss, mergewise_command, run_measured, write_report
from serve import Served, load, mergewise_serve, mixed_prompts
from vs_mergekit import compare_outputs, merge_config
from workloads import LlamaShape, build_workload

from mergewise.evaluate.comparison import mediator_recipe
from mergewise.zoo.manifest import load_zoo

MERGE_METHODS = ("ties", "task_arithmetic", "della")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def measured_row(step: str, setup: str, runs: list[Measured], note: str = "") -> str:
    walls = sorted(run.wall_s for run in runs)
    rss = max(run.peak_rss_mib for run in runs)
    return f"| {step} | {setup} | {walls[len(walls) // 2]:.1f} | {walls[0]:.1f}–{walls[-1]:.1f} | {rss:.0f} | {note} |"


def timed(command: list[str], log: Path, repeats: int) -> list[Measured]:
    return [run_measured(command, log) for _ in range(repeats)]


def merge_rows(args: argparse.Namespace, work: Path) -> list[str]:
    """Each method on the CPU first (the reference output), then on the device, then mergekit."""
    workload = build_workload(args.workdir, LlamaShape(layers=args.layers))
    rows = []
    for method in MERGE_METHODS:
        config = work / f"{method}.yaml"
        config.write_text(yaml.safe_dump(merge_config(method, workload), sort_keys=False))
        measured = {}
        for device in dict.fromkeys(("cpu", args.device)):
            out = work / f"{method}-{device.replace(':', '')}"
            command = mergewise_command("merge", str(config), str(out), "--device", device, "--quiet", "--overwrite")
            measured[device] = (out, timed(command, out.with_suffix(".log"), args.repeats))
        cpu_out = measured["cpu"][0]
        for device, (out, runs) in reversed(measured.items()):
            note = "" if device == "cpu" else f"{compare_outputs(out, cpu_out)} against the CPU"
            rows.append(measured_row(f"merge {method}", f"mergewise --device {device}", runs, note))
        if args.mergekit:
            out = work / f"{method}-mergekit"
            flag = "--cuda" if args.device.startswith("cuda") else "--no-cuda"
            runs = []
            for _ in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(
                    run_measured([args.mergekit, str(config), str(out), flag, "--quiet"], out.with_suffix(".log"))
                )
            note = "random draws" if method == "della" else f"{compare_outputs(cpu_out, out)} (mergewise CPU)"
            rows.append(measured_row(f"merge {method}", f"mergekit {flag}", runs, note))
    return rows


def calibration_rows(args: argparse.Namespace, work: Path, zoo) -> list[str]:
    rows = []
    for device in dict.fromkeys((args.device, "cpu")):
        stats = work / f"calibration-{device.replace(':', '')}.safetensors"
        command = mergewise_command(
            "calibrate", str(zoo.base), str(stats), "--data", "self", "--device", device, "--quiet", "--overwrite"
        )
        rows.append(measured_row("AIM calibrate", f"--device {device}", timed(command, stats.with_suffix(".log"), 1)))
    return rows


def mediator_rows(args: argparse.Namespace, work: Path, zoo) -> tuple[list[str], Path]:
    recipe = work / "mediator.yml"
    recipe.write_text(yaml.safe_dump(mediator_recipe(zoo, "bfloat16")))
    rows = []
    for device in dict.fromkeys(("cpu", args.device)):
        out = work / f"mediator-{device.replace(':', '')}"
        command = mergewise_command("mediator", "build", str(recipe), str(out), "--device", device, "--quiet")
        command += ["--overwrite", "--seed", "0"]
        rows.append(measured_row("Mediator build", f"--device {device}", timed(command, out.with_suffix(".log"), 1)))
    return rows[::-1], out


def serving_rows(args: argparse.Namespace, work: Path, zoo, mediator: Path) -> list[str]:
    prompts = mixed_prompts(zoo, args.requests)
    rows = []
    for device in dict.fromkeys((args.device, "cpu")):
        served = Served(mergewise_serve(mediator, "--device", device), "auto", work / f"serve-{device}.log")
        try:
            targets = [(served, prompt) for _, prompt in prompts]
            asyncio.run(load(targets[:2], 1, args.max_tokens))  # warm-up
            with PeakRss([served.process.pid]) as peak:
                seconds, outcomes = asyncio.run(load(targets, args.concurrency, args.max_tokens))
        finally:
            served.stop()
        done = [outcome for outcome in outcomes if outcome is not None and outcome.failed is None]
        latencies = sorted(outcome.latency for outcome in done) or [float("nan")]
        p50, p99 = (latencies[int(q * (len(latencies) - 1))] * 1000 for q in (0.5, 0.99))
        tokens = sum(outcome.tokens for outcome in done)
        notes = (
            f"{len(done) / seconds:.2f} req/s, {tokens / seconds:.1f} tok/s, latency p50 {p50:.0f} ms, "
            f"p99 {p99:.0f} ms, {len(outcomes) - len(done)} failed"
        )
        setup = f"--device {device}, {args.concurrency} clients"
        rows.append(f"| serve Mediator | {setup} | {seconds:.1f} | | {peak.mib:.0f} | {notes} |")
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, required=True, help="a built zoo (`mergewise zoo build`)")
    parser.add_argument("--device", default="cuda", help="the device to time (default cuda); cpu for a dry run")
    parser.add_argument("--workdir", type=Path, default=WORK, help="cache for W1 and the outputs")
    parser.add_argument("--layers", type=int, default=LlamaShape().layers, help="W1's depth")
    parser.add_argument("--repeats", type=int, default=3, help="runs per merge (medians)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--mergekit",
        default=os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml"),
        help="mergekit-yaml executable (default: $MERGEKIT_YAML, else PATH; none: no mergekit rows)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu for a dry run")
    return args


def main() -> None:
    args = parse_args()
    zoo = load_zoo(args.zoo)
    work = args.workdir / "gpu"
    work.mkdir(parents=True, exist_ok=True)
    rows = merge_rows(args, work) + calibration_rows(args, work, zoo)
    mediator_table, mediator = mediator_rows(args, work, zoo)
    rows += mediator_table + serving_rows(args, work, zoo, mediator)
    card = device_name(args.device)
    table = "\n".join(
        [
            f"Device: {card} (`--device {args.device}`); W1 at {args.layers} layers; zoo {args.zoo.name}.",
            "",
            "| step | setup | wall s (median) | range | peak RSS MB | notes |",
            "|---|---|---:|---:|---:|---|",
            *rows,
        ]
    )
    print(table)
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    write_report(args.results / f"gpu-{slug}.md", "mergewise on a GPU: merges, AIM, Mediator and serving", table, None)


if __name__ == "__main__":
    main()
