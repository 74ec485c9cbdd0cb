"""Time, memory and fidelity of `mergewise extract-lora` against `mergekit-extract-lora` on one fine-tune.

The base is W1's (`vs_mergekit.py`: a random bf16 Llama of ~207 M parameters); the fine-tune adds to
every matrix a difference of rank 24 with decaying singular values plus gaussian noise, so that the
adapter's rank decides how much of it survives. Each tool extracts an adapter at each rank in its own
child process (wall time and peak RSS: `common.run_measured`, the tools taking turns), then this
script loads both adapters and measures, with the same code for both, each module's relative
reconstruction error ‖ΔW − scale·B·A‖ / ‖ΔW‖ against the exact float32 difference of the two models.

    python benchmarks/vs_mergekit_extract_lora.py                  # ranks 8 and 32, both tools
    python benchmarks/vs_mergekit_extract_lora.py --ranks 16 --repeats 1 --only mergewise
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
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
from safetensors.torch import load_file
from workloads import LlamaShape, build_workload, tensor_files, write_sharded

TRUE_RANK = 24  # rank of the structured part of each matrix's difference
DECAY = 0.9  # ratio of successive singular values of that part
STRUCTURED_SHARE = 0.02  # ‖structured part‖ / ‖W‖
NOISE_SHARE = 0.005  # ‖gaussian noise‖ / ‖W‖, also the share of noise on 1-D tensors (norms)
PEFT_PREFIX = "base_model.model."
RESULTS_NAME = "vs-mergekit-extract-lora.md"


def low_rank_fine_tune(base: Path, generator: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors, in bf16, each plus a seeded structured difference and noise; one at a time."""
    for name, path in tensor_files(base).items():
        with safe_open(path, "pt") as handle:
            weight = handle.get_tensor(name).float()
        scale = float(weight.norm())
        noise = torch.randn(weight.shape, generator=generator)
        delta = NOISE_SHARE * scale * noise / noise.norm()
        if weight.ndim == 2:
            left, _ = torch.linalg.qr(torch.randn(weight.shape[0], TRUE_RANK, generator=generator))
            right, _ = torch.linalg.qr(torch.randn(weight.shape[1], TRUE_RANK, generator=generator))
            values = DECAY ** torch.arange(TRUE_RANK, dtype=torch.float32)
            delta += STRUCTURED_SHARE * scale / float(values.norm()) * (left * values) @ right.T
        yield name, (weight + delta).to(torch.bfloat16)


def build_fine_tune(workload: Path, seed: int = 100) -> Path:
    """Write (once) the low-rank fine-tune of the workload's base beside it, sharded like the base."""
    base, out = workload / "base", workload / "lowrank-ft"
    if (out / "COMPLETE").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for path in base.iterdir():  # config and tokenizer
        if path.is_file() and "safetensors" not in path.name:
            shutil.copy2(path, out / path.name)
    write_sharded(low_rank_fine_tune(base, torch.Generator().manual_seed(seed)), out)
    (out / "COMPLETE").touch()
    return out


def tool_command(
    tool: str, fine_tune: Path, base: Path, out_dir: Path, rank: int, args: argparse.Namespace
) -> list[str]:
    if tool == "mergekit":
        command = [
            args.mergekit_extract_lora,
            "--model",
            str(fine_tune),
            "--base-model",
            str(base),
            "--out-path",
            str(out_dir),
            "--max-rank",
            str(rank),
            "--no-cuda",
            "--quiet",
        ]
        return command + (["-j", str(args.threads)] if args.threads is not None else [])
    return mergewise_command("extract-lora", str(fine_tune), str(base), str(out_dir), "--rank", str(rank), "--quiet")


def extract(tool: str, rank: int, fine_tune: Path, base: Path, args: argparse.Namespace) -> Measured:
    """Extract `tool`'s adapter at `rank` into a fresh folder."""
    out_dir = adapter_dir(tool, rank, args)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"rank {rank}: running {tool} ...", flush=True)
    return run_measured(tool_command(tool, fine_tune, base, out_dir, rank, args), out_dir.with_suffix(".log"), env)


def adapter_dir(tool: str, rank: int, args: argparse.Namespace) -> Path:
    """Where `tool` writes its rank-`rank` adapter; the last round's stays for the measurements."""
    return args.workdir / "runs" / f"extract-lora-r{rank}-{tool}"


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's per-module override: a key equal to the module's name or to a dotted suffix of it."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


@dataclass(frozen=True)
class Fidelity:
    """How one adapter stands for the fine-tune: each LoRA module's relative error, and what it covers."""

    lora_errors: dict[str, float]  # module → ‖ΔW − scale·B·A‖ / ‖ΔW‖
    full_rank: int  # tensors the adapter stores whole (PEFT's modules_to_save)
    left_out: int  # changed tensors the adapter does not carry
    whole_error: float  # over every tensor: √Σ‖residual‖² / √Σ‖ΔW‖² (a left-out tensor's residual is ΔW)
    adapter_mb: float


def fidelity(adapter: Path, fine_tune: Path, base: Path) -> Fidelity:
    """Each tool's adapter measured the same way: LoRA pairs with PEFT's scale (lora_alpha/r, or /√r with
    rsLoRA; per-module rank_pattern and alpha_pattern), whole tensors against the fine-tune's."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights_path = adapter / "adapter_model.safetensors"
    stored = {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in load_file(weights_path).items()}
    tuned_files = tensor_files(fine_tune)
    lora_errors, full_rank, left_out, residual_sq, delta_sq = {}, 0, 0, 0.0, 0.0
    for name, path in tensor_files(base).items():
        with safe_open(path, "pt") as b_file, safe_open(tuned_files[name], "pt") as f_file:
            original = b_file.get_tensor(name).float()
            delta = f_file.get_tensor(name).float() - original
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in stored:
            down, up = stored.pop(f"{module}.lora_A.weight").float(), stored.pop(f"{module}.lora_B.weight").float()
            rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            residual = float((delta - scale * up @ down).norm())
            lora_errors[module] = residual / float(delta.norm())
        elif name in stored:
            full_rank += 1
            residual = float((stored.pop(name).float() - original - delta).norm())
        else:
            left_out += bool(delta.any())
            residual = float(delta.norm())
        residual_sq += residual**2
        delta_sq += float(delta.norm()) ** 2
    if stored:
        sys.exit(f"{weights_path}: tensors this benchmark does not read: {sorted(stored)[:3]}")
    return Fidelity(
        lora_errors, full_rank, left_out, math.sqrt(residual_sq / delta_sq), weights_path.stat().st_size / 1e6
    )


def agreement(ours: Fidelity, theirs: Fidelity, reported: dict[str, float]) -> str:
    """The 'output vs mergekit' cell: by how much mergewise's per-module error exceeds mergekit's (an
    exact truncated SVD, `torch.linalg.svd`) at worst, and how far mergewise's own extraction.json is
    from this script's measurement."""
    common = ours.lora_errors.keys() & theirs.lora_errors.keys()
    excess = max(ours.lora_errors[m] / theirs.lora_errors[m] - 1 for m in common)
    own = max(abs(reported[m] - ours.lora_errors[m]) for m in ours.lora_errors)
    return (
        f"{len(common)} common modules: error at most {100 * excess:.2f} % above mergekit's exact SVD "
        f"(extraction.json within {own:.1e})"
    )


def fidelity_table(rows: list[tuple[int, str, Fidelity]]) -> str:
    lines = [
        "| rank | tool | LoRA modules | error worst | error mean | full-rank tensors | changed tensors left out "
        "| error over all tensors | adapter MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, tool, result in rows:
        errors = list(result.lora_errors.values())
        lines.append(
            f"| {rank} | {tool} | {len(errors)} | {max(errors):.4f} | {statistics.mean(errors):.4f} | "
            f"{result.full_rank} | {result.left_out} | {result.whole_error:.4f} | {result.adapter_mb:.0f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=WORK, help="cache for the models and adapters")
    parser.add_argument("--only", choices=TOOLS, help="run a single tool")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both tools, and mergekit's -j")
    parser.add_argument(
        "--mergekit-extract-lora",
        default=os.environ.get("MERGEKIT_EXTRACT_LORA") or shutil.which("mergekit-extract-lora"),
        help="mergekit-extract-lora executable (default: $MERGEKIT_EXTRACT_LORA, else PATH)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool and rank; tables give medians")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the markdown report goes")
    args = parser.parse_args()
    if args.only != "mergewise" and not args.mergekit_extract_lora:
        parser.error("mergekit-extract-lora not found: set MERGEKIT_EXTRACT_LORA or pass --mergekit-extract-lora")
    return args


def main() -> None:
    args = parse_args()
    workload = build_workload(args.workdir, LlamaShape())
    base, fine_tune = workload / "base", build_fine_tune(workload)
    tools = [args.only] if args.only else list(TOOLS)
    runs: list[Run] = []
    fidelities: list[tuple[int, str, Fidelity]] = []
    agreements: dict[str, str] = {}
    for rank in args.ranks:
        label = f"rank {rank}"
        runs += repeated(
            label, tools, functools.partial(extract, rank=rank, fine_tune=fine_tune, base=base, args=args), args.repeats
        )
        measured = {tool: fidelity(adapter_dir(tool, rank, args), fine_tune, base) for tool in tools}
        fidelities += [(rank, tool, measured[tool]) for tool in tools]
        if tools == list(TOOLS):
            reported = json.loads((adapter_dir("mergewise", rank, args) / "extraction.json").read_text())
            agreements[label] = agreement(measured["mergewise"], measured["mergekit"], reported["relative_error"])
        for tool in tools:
            shutil.rmtree(adapter_dir(tool, rank, args), ignore_errors=True)
    shape = (
        f"fine-tune: each matrix + rank-{TRUE_RANK} difference (singular values ×{DECAY} each, "
        f"‖·‖ = {STRUCTURED_SHARE:g}·‖W‖) + gaussian noise ({NOISE_SHARE:g}·‖W‖, on norms too)"
    )
    report = f"{shape}\n\n{comparison_table(runs, agreements)}\n\n{fidelity_table(fidelities)}"
    title = "mergewise extract-lora vs mergekit-extract-lora on W1's base (~200M Llama, bf16)"
    write_report(args.results / RESULTS_NAME, title, report, args.threads)


if __name__ == "__main__":
    main()
