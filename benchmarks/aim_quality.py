"""AIM on the micro zoo: every core merge method without and with the relaxation at several ω.

The base is calibrated once (`--data self`: task-agnostic and offline); each method is merged once
and relaxed at each ω with `mergewise aim` (the `aim:` recipe block gives identical tensors, see
tests/test_aim.py). Every model is scored with the zoo's evaluation: exact match per task and the
per-token NLL of general text. Writes benchmarks/results/aim_quality.md.

    python benchmarks/aim_quality.py --zoo /tmp/zoo-micro [--limit 60] [--omegas 0.2 0.4 0.6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mergewise.aim import AimSettings, CalibrationSettings, calibrate, relax_folder
from mergewise.engine import run_merge
from mergewise.evaluate.zoo_eval import evaluate_model
from mergewise.zoo.manifest import load_zoo

RESULTS = Path(__file__).parent / "results" / "aim_quality.md"
# Per-method parameters of each expert; the zoo's own example configs use the same values for the
# first three.
METHODS = {
    "linear": {"weight": 0.25},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    "breadcrumbs": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
}


def recipe(zoo, method: str) -> dict:
    experts = [task.expert for task in zoo.tasks.values() if task.expert is not None]
    models = [{"model": str(expert), "parameters": METHODS[method]} for expert in experts]
    if method == "linear":  # linear takes the base as an input: give it no weight
        models.append({"model": str(zoo.base), "parameters": {"weight": 0.0}})
    return {"merge_method": method, "base_model": str(zoo.base), "models": models, "dtype": "float32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("/tmp/zoo-micro"))
    parser.add_argument("--omegas", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--limit", type=int, default=60, help="prompts per task and general windows scored")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    zoo = load_zoo(args.zoo)
    work = Path(tempfile.mkdtemp(prefix="aim-quality-"))
    stats = calibrate(zoo.base, work / "stats.safetensors",
                      CalibrationSettings("self", args.samples, args.seq_len), quiet=True)
    rows = [("base", "—", evaluate_model(zoo.base, zoo.root, limit=args.limit))]
    for method in METHODS:
        merged = run_merge(recipe(zoo, method), work / method, seed=0, quiet=True)
        rows.append((method, "—", evaluate_model(merged, zoo.root, limit=args.limit)))
        for omega in args.omegas:
            relaxed = relax_folder(zoo.base, merged, stats, work / f"{method}-aim{omega}",
                                   AimSettings(omega=omega), quiet=True)
            rows.append((method, f"{omega}", evaluate_model(relaxed, zoo.root, limit=args.limit)))
        print(time.strftime("%H:%M:%S"), method, "done", flush=True)
    tasks = list(zoo.tasks)
    lines = [
        "# AIM on the micro zoo",
        "",
        f"Zoo `{zoo.root}` ({len(tasks)} tasks, experts merged with the parameters in benchmarks/aim_quality.py); "
        f"statistics from `calibrate --data self --samples {args.samples} --seq-len {args.seq_len}`; "
        f"first {args.limit} prompts per task and {args.limit} general windows scored. Exact match per task "
        "(higher is better), mean over tasks, general per-token NLL (lower is better).",
        "",
        f"| method | ω | {' | '.join(tasks)} | mean EM | general NLL |",
        f"|---|---|{'---:|' * len(tasks)}---:|---:|",
    ]
    for method, omega, result in rows:
        scores = [result["tasks"][task]["score"] for task in tasks]
        lines.append(f"| {method} | {omega} | {' | '.join(f'{score:.3f}' for score in scores)} | "
                     f"{sum(scores) / len(scores):.3f} | {result['general']['score']:.4f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
