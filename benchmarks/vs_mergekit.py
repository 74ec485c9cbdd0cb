"""Time and memory of mergewise against mergekit on the same merges of a ~200M-parameter Llama.

Workload W1: a random bf16 Llama (hidden 1024, 12 layers, untied lm_head, vocab 32000) and three
fine-tunes of it, sharded at 200 MB with an index, cached under --workdir. Each tool runs as its
own child process so that its wall time and peak RSS (from `os.wait4`) are its alone.

    python benchmarks/vs_mergekit.py                 # both tools, ties, task_arithmetic, sce and della
    python benchmarks/vs_mergekit.py --only mergekit
    python benchmarks/vs_mergekit.py --depth-sweep   # mergewise peak RSS at 6, 12 and 24 layers
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
from pathlib import Path

import torch
import yaml
from common import (
    RESULTS,
    TOOLS,
    WORK,
    Measured,
    Run,
    comparison_table,
    mergewise_command,
    repeated,
    run_measured,
    write_report,
)
from safetensors import safe_open
from workloads import NUM_FINE_TUNES, LlamaShape, build_workload, parameter_count, tensor_files

METHODS = ("ties", "task_arithmetic", "sce", "della")
SCE_SELECT_TOPK = 0.5
DELLA_EPSILON = 0.1
# (speed-up over mergekit, peak RSS relative to mergekit or None) the engine aims at on 2 cores.
TARGETS = {"ties": (12.0, 0.5), "task_arithmetic": (4.0, 0.3), "sce": (3.0, 0.6), "della": (5.0, None)}
# Methods whose output is a random draw: mergekit's and mergewise's differ by design (the peer
# tests compare their kept shares and update sizes instead).
RANDOM = {"della"}
SWEEP_DEPTHS = (6, 12, 24)
SWEEP_METHOD = "ties"


def merge_config(method: str, workload: Path) -> dict:
    """The mergekit-style YAML both tools read: each fine-tune weighted 1/3 (TIES and DELLA at
    density 0.5, DELLA's ε 0.1); SCE weighs the fine-tunes itself, so it only gets the share of
    entries it selects."""
    config = {
        "merge_method": method,
        "base_model": str(workload / "base"),
        "models": [{"model": str(workload / "base")}],
        "dtype": "bfloat16",
    }
    fine_tunes = [{"model": str(workload / f"ft{i}")} for i in range(1, NUM_FINE_TUNES + 1)]
    if method == "sce":
        config["parameters"] = {"select_topk": SCE_SELECT_TOPK}
    else:
        per_model = {"weight": round(1 / NUM_FINE_TUNES, 4)}
        if method in ("ties", "della"):
            per_model["density"] = 0.5
        if method == "della":
            per_model["epsilon"] = DELLA_EPSILON
        for entry in fine_tunes:
            entry["parameters"] = per_model
    config["models"] += fine_tunes
    return config


def tool_command(tool: str, config_path: Path, out_dir: Path, args: argparse.Namespace) -> list[str]:
    if tool == "mergekit":
        command, threads_flag = [args.mergekit, str(config_path), str(out_dir), "--no-cuda", "--quiet"], "-j"
    else:
        command, threads_flag = mergewise_command("merge", str(config_path), str(out_dir), "--quiet"), "--threads"
    if args.threads is not None:
        command += [threads_flag, str(args.threads)]
    return command


def benchmark(method: str, tool: str, workload: Path, args: argparse.Namespace) -> Measured:
    """Merge `workload` with `tool`, into a fresh output folder."""
    runs_dir = args.workdir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    config_path = runs_dir / f"{workload.name}-{method}.yaml"
    config_path.write_text(yaml.safe_dump(merge_config(method, workload), sort_keys=False))
    out_dir = output_dir(method, tool, workload, args)
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"{method}: running {tool} ...", flush=True)
    return run_measured(tool_command(tool, config_path, out_dir, args), out_dir.with_suffix(".log"), env)


def output_dir(method: str, tool: str, workload: Path, args: argparse.Namespace) -> Path:
    """Where `tool` writes `method`'s merge; the last round's output stays for the comparison."""
    return args.workdir / "runs" / f"{workload.name}-{method}-{tool}"


def compare_outputs(ours: Path, theirs: Path) -> str:
    """Both tools' outputs tensor by tensor: how many are identical, and the worst relative error."""
    ours_files, theirs_files = tensor_files(ours), tensor_files(theirs)
    if ours_files.keys() != theirs_files.keys():
        return f"different tensor names: {sorted(ours_files.keys() ^ theirs_files.keys())[:3]}"
    identical = 0
    worst = 0.0
    for name in sorted(ours_files):
        with safe_open(ours_files[name], "pt") as a_file, safe_open(theirs_files[name], "pt") as b_file:
            a, b = a_file.get_tensor(name), b_file.get_tensor(name)
        identical += bool(torch.equal(a, b))
        error = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))
        worst = max(worst, error)
    return f"{identical}/{len(ours_files)} identical, worst {worst:.1e}"


def sweep_table(runs: list[tuple[LlamaShape, Run]]) -> str:
    lines = ["| layers | parameters (M) | wall s | peak RSS MB |", "|---:|---:|---:|---:|"]
    for shape, run in runs:
        parameters = parameter_count(shape) / 1e6
        lines.append(f"| {shape.layers} | {parameters:.0f} | {run.wall_s:.1f} | {run.peak_rss_mb:.0f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=WORK, help="cache for workloads and outputs")
    parser.add_argument("--only", choices=TOOLS, help="run a single tool")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, help="CPU threads for each tool (default: the tool's own)")
    parser.add_argument("--depth-sweep", action="store_true", help=f"mergewise {SWEEP_METHOD} at {SWEEP_DEPTHS} layers")
    parser.add_argument(
        "--mergekit",
        default=os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml"),
        help="mergekit-yaml executable (default: $MERGEKIT_YAML, else PATH)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool and merge; tables give medians")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the markdown reports go")
    parser.add_argument("--report", default="vs_mergekit.md", help="file name of the comparison's report")
    args = parser.parse_args()
    needs_mergekit = not args.depth_sweep and args.only != "mergewise"
    if needs_mergekit and not args.mergekit:
        parser.error("mergekit-yaml not found: set MERGEKIT_YAML or pass --mergekit (or use --only mergewise)")
    return args


def main() -> None:
    args = parse_args()
    if args.depth_sweep:
        sweep = []
        for layers in SWEEP_DEPTHS:
            shape = LlamaShape(layers=layers)
            workload = build_workload(args.workdir, shape)
            runs = repeated(
                SWEEP_METHOD,
                ["mergewise"],
                functools.partial(benchmark, SWEEP_METHOD, workload=workload, args=args),
                args.repeats,
            )
            sweep.extend((shape, run) for run in runs)
        title = f"mergewise {SWEEP_METHOD}: peak RSS by depth"
        write_report(args.results / "depth_sweep.md", title, sweep_table(sweep), args.threads)
        return
    workload = build_workload(args.workdir, LlamaShape())
    tools = [args.only] if args.only else list(TOOLS)
    runs, agreement = [], {}
    for method in args.methods:
        runs += repeated(
            method, tools, functools.partial(benchmark, method, workload=workload, args=args), args.repeats
        )
        outputs = [output_dir(method, tool, workload, args) for tool in TOOLS]
        if tools == list(TOOLS):
            agreement[method] = "random draws" if method in RANDOM else compare_outputs(outputs[1], outputs[0])
        for folder in outputs:
            shutil.rmtree(folder, ignore_errors=True)
    title = "mergewise vs mergekit on W1 (~200M Llama, bf16)"
    write_report(args.results / args.report, title, comparison_table(runs, agreement, TARGETS), args.threads)


if __name__ == "__main__":
    main()
