"""`merge --check` / `--dry-run`'s peak-memory estimate against the peak RSS the merge then has.

Each method declares its working memory (`WorkingMemory`: a fixed part and bytes per entry of the
largest tensor); the figures were taken from W1 and `wide`, two bf16 Llamas whose largest tensors
(the embeddings) differ. `held-out`, a third shape, checks that the rule carries to a model it was
not taken from. Every merge is of a base and three fine-tunes (slerp: two models).

    python benchmarks/memory_estimate.py
    python benchmarks/memory_estimate.py --methods ties della --workloads held-out
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from common import RESULTS, WORK, mergewise_command, run_measured, write_report
from workloads import NUM_FINE_TUNES, LlamaShape, build_workload

WORKLOADS = {  # name: (shape, the figures were taken from it)
    "W1": (LlamaShape(), True),
    "wide": (LlamaShape(hidden=1536, layers=2, intermediate=4096, vocab=48000), True),
    "held-out": (LlamaShape(hidden=2048, layers=2, intermediate=5632, vocab=24000), False),
}
WITH_BASE = {
    "task_arithmetic": {"weight": 0.33},
    "ties": {"weight": 0.33, "density": 0.5},
    "dare_ties": {"weight": 0.33, "density": 0.5},
    "breadcrumbs_ties": {"weight": 0.33, "density": 0.5, "gamma": 0.01},
    "della": {"weight": 0.33, "density": 0.5, "epsilon": 0.1},
    "sce": {},
    "model_stock": {},
}
WITHOUT_BASE = {"linear": {"weight": 1.0}, "karcher": {}, "multislerp": {"weight": 1.0}, "nuslerp": {"weight": 0.5}}
METHODS = (*WITH_BASE, *WITHOUT_BASE, "slerp")
ESTIMATE = re.compile(r"peak memory about ([\d.]+) (GB|MB|kB)")
UNITS = {"GB": 1e9, "MB": 1e6, "kB": 1e3}


def recipe(method: str, folder: Path) -> dict:
    fine_tunes = [folder / f"ft{index}" for index in range(1, NUM_FINE_TUNES + 1)]
    if method == "slerp":
        models = [{"model": str(folder / "base")}, {"model": str(fine_tunes[0])}]
        return {"merge_method": method, "base_model": str(folder / "base"), "models": models, "parameters": {"t": 0.5}}
    if method == "nuslerp":
        fine_tunes = fine_tunes[:2]
    parameters = WITH_BASE.get(method, WITHOUT_BASE.get(method))
    models = [{"model": str(path), **({"parameters": parameters} if parameters else {})} for path in fine_tunes]
    base = {"base_model": str(folder / "base")} if method in WITH_BASE else {}
    top = {"parameters": {"select_topk": 0.5}} if method == "sce" else {}
    return {"merge_method": method, **base, "models": models, **top, "dtype": "bfloat16"}


def estimate_mib(recipe_file: Path) -> float:
    """The estimate `mergewise merge --check` prints, in MiB (what the peak RSS is measured in)."""
    done = subprocess.run(mergewise_command("merge", str(recipe_file), "--check"), capture_output=True, text=True)
    found = ESTIMATE.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{recipe_file}: no estimate in `merge --check`:\n{done.stdout}{done.stderr}")
    return float(found.group(1)) * UNITS[found.group(2)] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--workdir", type=Path, default=WORK)
    parser.add_argument("--report", default="memory_estimate.md")
    args = parser.parse_args()
    runs = args.workdir / "runs" / "memory-estimate"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for workload in args.workloads:
        shape, fitted = WORKLOADS[workload]
        folder = build_workload(args.workdir, shape)
        for method in args.methods:
            recipe_file = runs / f"{workload}-{method}.yml"
            recipe_file.write_text(yaml.safe_dump(recipe(method, folder), sort_keys=False))
            estimate = estimate_mib(recipe_file)
            out = runs / f"{workload}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"{workload} {method}: merging ...", flush=True)
            measured = run_measured(mergewise_command("merge", str(recipe_file), str(out), "--quiet"))
            shutil.rmtree(out)
            rows.append(
                f"| {method} | {workload} | {shape.vocab * shape.hidden / 1e6:.1f} M | {'yes' if fitted else 'no'} | "
                f"{estimate:.0f} | {measured.peak_rss_mib:.0f} | {estimate / measured.peak_rss_mib:.2f} |"
            )
    header = (
        "| method | workload | largest tensor | figures taken from it | estimate MiB | peak RSS MiB "
        "| estimate / peak |\n|---|---|---:|---|---:|---:|---:|"
    )
    write_report(
        RESULTS / args.report,
        "merge --check's peak-memory estimate against the merge's peak RSS",
        "\n".join([header, *rows]),
        None,
    )


if __name__ == "__main__":
    main()
