"""Time and memory of mergewise against mergekit on the same merges of a ~200M-parameter Llama.

Workload W1: a random bf16 Llama (hidden 1024, 12 layers, untied lm_head, vocab 32000) and three
fine-tunes of it, sharded at 200 MB with an index, cached under --workdir. Each tool runs as its
own child process so that its wall time and peak RSS (from `os.wait4`) are its alone.

    python benchmarks/vs_mergekit.py                 # both tools, ties, task_arithmetic and sce
    python benchmarks/vs_mergekit.py --only mergekit
    python benchmarks/vs_mergekit.py --depth-sweep   # mergewise peak RSS at 6, 12 and 24 layers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig


ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # the repository: tests.support builds the models
from tests.support.tiny_models import build_fine_tune, save_tokenizer  # noqa: E402
SHARD_BYTES = 200 * 10**6
NUM_FINE_TUNES = 3
FINE_TUNE_NOISE = 0.01
TOOLS = ("mergekit", "mergewise")
METHODS = ("ties", "task_arithmetic", "sce")
SCE_SELECT_TOPK = 0.5
# (speed-up over mergekit, peak RSS relative to mergekit) the engine aims at on 2 cores.
TARGETS = {"ties": (8.0, 0.6), "task_arithmetic": (3.0, 0.8)}
SWEEP_DEPTHS = (6, 12, 24)
SWEEP_METHOD = "ties"


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 1024
    layers: int = 12
    intermediate: int = 2816
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 8

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


@dataclass(frozen=True)
class Run:
    """Repeated measurements of one tool on one merge; tables give the medians."""

    method: str
    tool: str
    walls_s: tuple[float, ...]
    peaks_rss_mb: tuple[float, ...]

    @property
    def wall_s(self) -> float:
        return statistics.median(self.walls_s)

    @property
    def peak_rss_mb(self) -> float:
        return statistics.median(self.peaks_rss_mb)

    @property
    def wall_range(self) -> str:
        return f"{min(self.walls_s):.1f}–{max(self.walls_s):.1f}" if len(self.walls_s) > 1 else ""


def llama_tensors(shape: LlamaShape, generator: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """Random bf16 tensors named as in `LlamaForCausalLM`, one at a time so memory stays small."""

    def weight(*dims: int) -> torch.Tensor:
        return (0.02 * torch.randn(dims, generator=generator)).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1 + 0.02 * torch.randn(shape.hidden, generator=generator)).to(torch.bfloat16)

    h, kv, mlp = shape.hidden, shape.kv_dim, shape.intermediate
    yield "model.embed_tokens.weight", weight(shape.vocab, h)
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", norm()
        for projection, dims in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            yield f"{prefix}.self_attn.{projection}.weight", weight(*dims)
        yield f"{prefix}.post_attention_layernorm.weight", norm()
        for projection, dims in (("gate_proj", (mlp, h)), ("up_proj", (mlp, h)), ("down_proj", (h, mlp))):
            yield f"{prefix}.mlp.{projection}.weight", weight(*dims)
    yield "model.norm.weight", norm()
    yield "lm_head.weight", weight(shape.vocab, h)


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, shard_bytes: int) -> None:
    """Save tensors as `model-XXXXX-of-YYYYY.safetensors` shards plus the HF index, one shard in memory."""
    names_by_shard: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_size = total_size = 0

    def flush() -> None:
        nonlocal shard_size
        save_file(shard, out_dir / f"shard-{len(names_by_shard) + 1}.tmp", metadata={"format": "pt"})
        names_by_shard.append(list(shard))
        shard.clear()
        shard_size = 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_size + size > shard_bytes:
            flush()
        shard[name] = tensor
        shard_size += size
        total_size += size
    flush()

    weight_map = {}
    for number, names in enumerate(names_by_shard, start=1):
        file_name = f"model-{number:05d}-of-{len(names_by_shard):05d}.safetensors"
        (out_dir / f"shard-{number}.tmp").rename(out_dir / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def llama_config(shape: LlamaShape) -> LlamaConfig:
    """The bf16 `LlamaForCausalLM` config of `shape`, with an untied lm_head."""
    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def build_workload(workdir: Path, shape: LlamaShape, seed: int = 0) -> Path:
    """Build (once) base + fine-tunes for `shape` under `workdir`; return the workload folder."""
    root = workdir / f"llama-h{shape.hidden}-l{shape.layers}"
    done_marker = root / "COMPLETE"
    if done_marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    base = root / "base"
    base.mkdir(parents=True)
    print(f"building workload in {root} ...", flush=True)
    start = time.perf_counter()
    llama_config(shape).save_pretrained(base)
    save_tokenizer(base)
    write_sharded(llama_tensors(shape, torch.Generator().manual_seed(seed)), base, SHARD_BYTES)
    for index in range(1, NUM_FINE_TUNES + 1):
        build_fine_tune(base, root / f"ft{index}", seed=seed + index, noise=FINE_TUNE_NOISE)
    done_marker.touch()
    print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def merge_config(method: str, workload: Path) -> dict:
    """The mergekit-style YAML both tools read: each fine-tune weighted 1/3 (TIES at density 0.5);
    SCE weighs the fine-tunes itself, so it only gets the share of entries it selects."""
    config = {"merge_method": method, "base_model": str(workload / "base"), "models": [{"model": str(workload / "base")}],
              "dtype": "bfloat16"}
    fine_tunes = [{"model": str(workload / f"ft{i}")} for i in range(1, NUM_FINE_TUNES + 1)]
    if method == "sce":
        config["parameters"] = {"select_topk": SCE_SELECT_TOPK}
    else:
        per_model = {"weight": round(1 / NUM_FINE_TUNES, 4)}
        if method == "ties":
            per_model["density"] = 0.5
        for entry in fine_tunes:
            entry["parameters"] = per_model
    config["models"] += fine_tunes
    return config


# Runs the command given after it and prints its wall time and peak RSS. A child's ru_maxrss also
# counts the memory of the process that spawned it (Linux carries the pre-exec peak across exec),
# so this small launcher stands between the benchmark, which holds torch and compared tensors, and
# each measured tool.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, 2, 1)])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], log_path: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run `command` with output to `log_path`; return (wall seconds, peak RSS in MB) of that command."""
    with open(log_path, "wb") as log:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, *command], stdout=subprocess.PIPE, stderr=log,
                              env=env, check=True)
    wall_s, max_rss_kib, exit_code = done.stdout.split()
    if int(exit_code) != 0:
        sys.exit(f"{' '.join(command)} failed; see {log_path}")
    return float(wall_s), int(max_rss_kib) / 1024  # ru_maxrss is in KiB on Linux


def tool_command(tool: str, config_path: Path, out_dir: Path, args: argparse.Namespace) -> list[str]:
    if tool == "mergekit":
        command, threads_flag = [args.mergekit, str(config_path), str(out_dir), "--no-cuda", "--quiet"], "-j"
    else:
        command = [sys.executable, "-m", "mergewise.cli", "merge", str(config_path), str(out_dir), "--quiet"]
        threads_flag = "--threads"
    if args.threads is not None:
        command += [threads_flag, str(args.threads)]
    return command


def benchmark(method: str, tool: str, workload: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Merge `workload` with `tool`, into a fresh output folder; (wall seconds, peak RSS MB)."""
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


def tensor_files(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files


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


def repeated(label: str, tools: list[str], measure: Callable[[str], tuple[float, float]], repeats: int) -> list[Run]:
    """`repeats` rounds of `measure(tool)` (wall seconds, peak RSS MB), the tools taking turns within
    each round, so that a slow spell of the machine falls on both rather than on one tool's runs."""
    rounds = [[measure(tool) for tool in tools] for _ in range(repeats)]
    return [Run(label, tool, tuple(r[index][0] for r in rounds), tuple(r[index][1] for r in rounds))
            for index, tool in enumerate(tools)]


def comparison_table(runs: list[Run], agreement: dict[str, str]) -> str:
    """Markdown: one row per run; mergewise rows also give speed-up and RSS ratio against mergekit, and
    how its output compares with mergekit's, tensor by tensor."""
    mergekit = {run.method: run for run in runs if run.tool == "mergekit"}
    lines = [
        "| method | tool | wall s (median) | range | peak RSS MB | speed-up vs mergekit | RSS vs mergekit | target (speed-up, RSS) | output vs mergekit |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in runs:
        speed = rss = target = ""
        reference = mergekit.get(run.method)
        if run.tool == "mergewise" and reference is not None:
            speed = f"{reference.wall_s / run.wall_s:.2f}×"
            rss = f"{run.peak_rss_mb / reference.peak_rss_mb:.2f}×"
        if run.tool == "mergewise" and run.method in TARGETS:
            target = "≥ {:g}×, ≤ {:g}×".format(*TARGETS[run.method])
        measured = f"{run.wall_s:.1f} | {run.wall_range} | {run.peak_rss_mb:.0f}"
        same = agreement.get(run.method, "") if run.tool == "mergewise" else ""
        lines.append(f"| {run.method} | {run.tool} | {measured} | {speed} | {rss} | {target} | {same} |")
    return "\n".join(lines)


def sweep_table(runs: list[tuple[LlamaShape, Run]]) -> str:
    lines = ["| layers | parameters (M) | wall s | peak RSS MB |", "|---:|---:|---:|---:|"]
    for shape, run in runs:
        parameters = parameter_count(shape) / 1e6
        lines.append(f"| {shape.layers} | {parameters:.0f} | {run.wall_s:.1f} | {run.peak_rss_mb:.0f} |")
    return "\n".join(lines)


def parameter_count(shape: LlamaShape) -> int:
    per_layer = 2 * shape.hidden * (shape.hidden + shape.kv_dim) + 3 * shape.hidden * shape.intermediate
    return shape.layers * per_layer + 2 * shape.vocab * shape.hidden


def write_report(path: Path, title: str, table: str, args: argparse.Namespace) -> None:
    threads = args.threads if args.threads is not None else "default"
    # The 15-minute load average spans the runs: above the CPU count, other work skewed the timings.
    load = os.getloadavg()[2]
    machine = f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, threads: {threads}, load {load:.1f}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{machine}, measured {time.strftime('%Y-%m-%d')}\n\n{table}\n")
    print(f"\n{table}\n\nwritten to {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".work", help="cache for workloads and outputs")
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
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="where the markdown reports go")
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
            runs = repeated(SWEEP_METHOD, ["mergewise"], lambda tool: benchmark(SWEEP_METHOD, tool, workload, args),
                            args.repeats)
            sweep.extend((shape, run) for run in runs)
        title = f"mergewise {SWEEP_METHOD}: peak RSS by depth"
        write_report(args.results / "depth_sweep.md", title, sweep_table(sweep), args)
        return
    workload = build_workload(args.workdir, LlamaShape())
    tools = [args.only] if args.only else list(TOOLS)
    runs, agreement = [], {}
    for method in args.methods:
        runs += repeated(method, tools, lambda tool: benchmark(method, tool, workload, args), args.repeats)
        outputs = [output_dir(method, tool, workload, args) for tool in TOOLS]
        if tools == list(TOOLS):
            agreement[method] = compare_outputs(outputs[1], outputs[0])
        for folder in outputs:
            shutil.rmtree(folder, ignore_errors=True)
    title = "mergewise vs mergekit on W1 (~200M Llama, bf16)"
    write_report(args.results / "vs_mergekit.md", title, comparison_table(runs, agreement), args)


if __name__ == "__main__":
    main()
