"""Mediator on a zoo: quality against memory, routing, build/inference memory and latency.

    python benchmarks/mediator.py --zoo /path/to/micro-zoo [--limit 100]

For every (memory budget, density) pair it builds a Mediator model from the zoo's experts (each
build a child process, so its peak RSS is its own), scores it with `mergewise eval`, and puts it
next to the experts (the oracle: each on its own task), the core merges and the dense model. Then it
times `generate()` with a selected expert against the same expert exported as a plain model, side by
side in one process, and measures the peak RSS of inference for both.

Writes benchmarks/results/mediator-<size>.md and mediator-<size>.png (quality against stored size).
Builds and scores are cached under --work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mergewise.evaluate.comparison import Entry, mediator_recipe, score_entries, zoo_entries
from mergewise.zoo.manifest import Zoo, load_zoo

RESULTS = Path(__file__).resolve().parent / "results"
CORE_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]


def build_mediator(zoo: Zoo, work: Path, budget: float, density: float | str) -> tuple[Path, dict]:
    """The Mediator folder for one setting and its build record (peak RSS, seconds, manifest)."""
    label = f"mediator-b{budget:g}-d{density if density == 'auto' else format(density, 'g')}"
    out = work / "models" / label
    record_path = work / "builds" / f"{label}.json"
    if not record_path.is_file():
        recipe = work / "recipes" / f"{label}.yml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(yaml.safe_dump(mediator_recipe(zoo, budget, density)))
        rss, seconds = peak_rss("mergewise.cli", "mediator", "build", str(recipe), str(out), "--overwrite", "--quiet",
                                "--seed", "0")
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps({"peak_rss_mib": rss, "seconds": seconds}))
    record = json.loads(record_path.read_text())
    record["manifest"] = json.loads((out / "mediator" / "mediator.json").read_text())
    return out, record


def kept_share(result: dict, results: dict, zoo: Zoo) -> float:
    """Mean over expert tasks of how much of the expert's own skill a model keeps: score / expert's
    score for exact match; for NLL tasks (lower is better) the share of the expert's gain over the base."""
    shares = []
    for name, task in zoo.tasks.items():
        if not task.expert:
            continue
        score, expert = result["tasks"][name]["score"], results[f"expert:{name}"]["tasks"][name]["score"]
        if task.metric == "nll":
            base = results["base"]["tasks"][name]["score"]
            shares.append((base - score) / (base - expert) if base != expert else 1.0)
        else:
            shares.append(score / expert if expert else 1.0)
    return statistics.mean(shares)


# Peak RSS is read by the child itself from VmHWM, which starts afresh at exec; ru_maxrss of a child
# would also count the pages of this (by then large) parent it was forked from. Read at exit by an
# exit handler: the command line ends with os._exit after running those, so a `finally` never runs.
MEASURED_CHILD = """
import atexit, runpy, sys

def report_peak():
    status = open("/proc/self/status").read()
    print("VmHWM", int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))), flush=True)

atexit.register(report_peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""


def peak_rss(module: str, *args: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `python -m module args…` in a child process."""
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", MEASURED_CHILD, module, *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{run.stderr}")
    kib = int(next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("VmHWM")))
    return kib / 1024, time.perf_counter() - started


LATENCY_CHILD = """
import statistics, sys, time, json, torch
from mergewise.mediator.runtime import load
mediator_dir, plain_dir, prompt, tokens, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
mediator, plain = load(mediator_dir), load(plain_dir)
first = time.perf_counter(); [(_, route)] = mediator.generate_text([prompt], max_new_tokens=tokens)
first = time.perf_counter() - first
times = {"mediator": [], "plain": []}
for _ in range(repeats):  # alternate so both see the same machine state
    for name, model in (("mediator", mediator), ("plain", plain)):
        start = time.perf_counter(); model.generate_text([prompt], max_new_tokens=tokens, min_new_tokens=tokens)
        times[name].append(time.perf_counter() - start)
print(json.dumps({"route": route.to_json(), "first": first,
                  **{name: statistics.median(values) for name, values in times.items()}}))
"""




def latency(mediator_dir: Path, zoo: Zoo, work: Path, tokens: int, repeats: int) -> dict:
    """Selected-expert generate() vs the same expert exported as a plain model, one process."""
    from mergewise.mediator.export import export_task

    task = next(name for name, entry in zoo.tasks.items() if entry.expert)
    prompt = zoo.eval_examples(task)[0]["prompt"]
    plain = work / "models" / f"export-{task}"
    if not (plain / "config.json").is_file():
        export_task(mediator_dir, task, plain, overwrite=True, quiet=True)
    output = subprocess.run([sys.executable, "-c", LATENCY_CHILD, str(mediator_dir), str(plain), prompt, str(tokens),
                             str(repeats)], check=True, capture_output=True, text=True).stdout
    timing = json.loads(output.strip().splitlines()[-1])
    memory = {name: peak_rss("mergewise.cli", "generate", str(folder), "--prompt", prompt, "--max-new-tokens",
                             str(tokens))[0]
              for name, folder in (("mediator", mediator_dir), ("plain", plain))}
    return {"task": task, **timing, "rss": memory}


def density_setting(text: str) -> float | str:
    return text if text == "auto" else float(text)


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for density in sorted({point["density"] for point in points}):
        line = sorted((p for p in points if p["density"] == density), key=lambda p: p["ratio"])
        axis.plot([p["ratio"] for p in line], [100 * p["kept"] for p in line], marker="o", label=f"density {density}")
        for p in line:
            axis.annotate(f"budget {p['budget']:g}", (p["ratio"], 100 * p["kept"]), fontsize=7,
                          textcoords="offset points", xytext=(4, -10))
    axis.axhline(95, color="grey", linestyle="--", linewidth=0.8, label="95% of the experts")
    axis.set_xlabel("stored size / one model")
    axis.set_ylabel("mean % of each expert's own score")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: ZOO/mediator-bench)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.25, 1.5, 2.0, 3.0])
    parser.add_argument("--densities", type=density_setting, nargs="+", default=["auto", 0.1, 0.25, 0.5])
    parser.add_argument("--default-budget", type=float, default=1.5,
                        help="the budget (at density auto) timed for latency and inference memory")
    parser.add_argument("--limit", type=int, default=None, help="prompts per task")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per timed generate()")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    zoo = load_zoo(args.zoo)
    work = args.work or args.zoo / "mediator-bench"
    entries = zoo_entries(zoo, CORE_METHODS)
    builds = {}
    for budget in args.budgets:
        for density in args.densities:
            folder, record = build_mediator(zoo, work, budget, density)
            builds[budget, density] = record
            entries.append(Entry(f"mediator b={budget:g} ρ={density if density == 'auto' else format(density, 'g')}", lambda _, f=folder: f))
    results = score_entries(args.zoo, work, entries, limit=args.limit)
    experts = [name for name, task in zoo.tasks.items() if task.expert]
    held = [name for name, task in zoo.tasks.items() if not task.expert]
    dense = results["linear"]  # the dense expert D is this average of the experts
    lines = [f"# Mediator on the {zoo.raw.get('size', '')} zoo", "",
             f"Experts: {', '.join(experts)}; held-back task: {', '.join(held) or 'none'}. "
             f"{args.limit or 'all'} prompts per task. Merge of calm units and dense expert: linear average.", "",
             "| model | " + " | ".join(zoo.tasks) + " | % of expert kept (mean) | routing correct | held-back blend+dense "
             "| stored / one model | build peak RSS |", "|" + "---|" * (len(zoo.tasks) + 6)]
    points = []
    for label, result in results.items():
        cells = [f"{result['tasks'][name]['score']:.3f}" for name in zoo.tasks]
        routing, ratio, rss = result.get("routing"), "1.000", ""
        if label.startswith("mediator"):
            budget, density = (density_setting(part[2:]) for part in label.split()[1:])
            record = builds[budget, density]
            ratio = f"{record['manifest']['memory']['ratio']:.3f}"
            rss = f"{record['peak_rss_mib']:.0f} MiB"
            points.append({"budget": budget, "density": str(density), "ratio": record["manifest"]["memory"]["ratio"],
                           "kept": kept_share(result, results, zoo)})
        correct = (f"{statistics.mean(routing[name]['correct'] for name in experts):.3f}" if routing else "")
        flagged = (f"{statistics.mean(routing[name]['blend'] + routing[name]['dense'] for name in held):.3f}"
                   if routing and held else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * kept_share(result, results, zoo):.1f}% | {correct} | "
                     f"{flagged} | {ratio} | {rss} |")
    default_dir = work / "models" / f"mediator-b{args.default_budget:g}-dauto"
    timing = latency(default_dir, zoo, work, args.tokens, args.repeats)
    if held:
        lines += ["", "Held-back task, dense model D: " + ", ".join(
            f"{name} {dense['tasks'][name]['score']:.3f}" for name in held)]
    lines += ["", f"## Latency and memory of inference (budget {args.default_budget:g}, density auto)", "",
        f"`generate()` of {args.tokens} new tokens for one `{timing['task']}` prompt (route: "
        f"{timing['route']['decision']} {timing['route']['task']}), median of {args.repeats}, alternating, one thread:",
        "", "| model | latency | peak RSS (load + generate) |", "|---|---:|---:|",
        f"| Mediator, selected expert | {1000 * timing['mediator']:.1f} ms | {timing['rss']['mediator']:.0f} MiB |",
        f"| same expert exported as a plain model | {1000 * timing['plain']:.1f} ms | {timing['rss']['plain']:.0f} MiB |",
        "", f"Ratio: **{timing['mediator'] / timing['plain']:.2f}×** (first request, which materialises the expert: "
        f"{1000 * timing['first']:.1f} ms)."]
    RESULTS.mkdir(exist_ok=True)
    size = zoo.raw.get("size", "zoo")
    (RESULTS / f"mediator-{size}.md").write_text("\n".join(lines) + "\n")
    plot(points, RESULTS / f"mediator-{size}.png", f"Mediator on the {size} zoo: quality vs memory")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
