"""`mergewise search` on the micro zoo: does a 32-trial search over ties' weights and densities and AIM's
ω beat the default recipe on held-out test prompts, and how long does it take with 1 and 2 workers?

    python benchmarks/search.py --zoo mergewise-demo/zoo-micro          # the demo's zoo
    python benchmarks/search.py --zoo ZOO --trials 32 --workers 1 2

Each worker count is its own `mergewise search` process (a fresh local Ray), on the same recipe and
seed: 1 worker gets both cores per trial, 2 workers one core each. Results go to
benchmarks/results/search-micro.md and search-micro.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml
from common import RESULTS, WORK, mergewise_command, run_measured, write_result

CORES = 2
DEFAULT_WEIGHT, DEFAULT_DENSITY, DEFAULT_OMEGA = 1.0, 0.5, 0.4  # the zoo's configs/ties.yml, AIM's default ω


def search_recipe(zoo: Path, trials: int, cpus: int, limit: int) -> dict:
    experts = sorted(path.name for path in zoo.iterdir() if path.name.startswith("expert-"))
    tasks = [name.removeprefix("expert-") for name in experts]
    return {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [
            {
                "model": str(zoo / expert),
                "parameters": {
                    "weight": {"search": "uniform", "low": 0.2, "high": 1.0, "default": DEFAULT_WEIGHT},
                    "density": {"search": "choice", "values": [0.3, 0.5, 0.7], "default": DEFAULT_DENSITY},
                },
            }
            for expert in experts
        ],
        "parameters": {"normalize": True},
        "aim": {
            "omega": {"search": "uniform", "low": 0.0, "high": 1.0, "default": DEFAULT_OMEGA},
            "calibration": {"data": "self", "samples": 64, "seq_len": 128},
        },
        "dtype": "float32",
        "search": {
            "trials": trials,
            "searcher": "optuna",
            "keep": 1,
            "resources": {"cpus": cpus},
            "objective": {"zoo": str(zoo), "tasks": {task: 1.0 for task in tasks}, "limit": limit},
        },
    }


def run_search(recipe: dict, workdir: Path) -> tuple[float, dict, list[dict]]:
    """One search in its own process; its wall time, summary.json and trials.csv rows."""
    import csv

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    recipe_path = workdir / "search.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    wall = run_measured(
        mergewise_command("search", str(recipe_path), str(workdir / "out"), "--quiet"), workdir / "search.log"
    ).wall_s
    with (workdir / "out" / "trials.csv").open() as file:
        rows = list(csv.DictReader(file))
    return wall, json.loads((workdir / "out" / "summary.json").read_text()), rows


def plain_ties_test_scores(zoo: Path, workdir: Path, objective: dict) -> dict:
    """The zoo's own configs/ties.yml (no AIM) on the same test prompts."""
    from mergewise import merge
    from mergewise.search.objective import score_model
    from mergewise.search.space import Objective

    out = merge(zoo / "configs" / "ties.yml", workdir / "plain-ties", overwrite=True, quiet=True)
    return score_model(Path(out), Objective(**objective), "test")


def report(zoo: Path, runs: dict[int, tuple[float, dict, list[dict]]], plain: dict, trials: int, limit: int) -> str:
    workers = sorted(runs)
    _, summary, _ = runs[workers[-1]]
    tasks = list(summary["best"]["test"]["tasks"])
    lines = [
        f"# `mergewise search` on the micro zoo ({zoo})",
        "",
        f"ties over the zoo's {len(tasks)} experts: each weight in [0.2, 1], each density in "
        "{0.3, 0.5, 0.7}, AIM's ω in [0, 1]; Optuna TPE, "
        f"{trials} trials scored on the first {limit} validation prompts of each task (exact match); "
        "the test half of each task's held-out prompts is scored once, after the search.",
        "",
        "| recipe | validation | test (mean) | " + " | ".join(f"test {task}" for task in tasks) + " |",
        "|---|---|---|" + "---|" * len(tasks),
    ]

    def line(name: str, validation, test: dict) -> str:
        cells = " | ".join(f"{test['tasks'][task]:.3f}" for task in tasks)
        validation = "–" if validation is None else f"{validation:.3f}"
        return f"| {name} | {validation} | {test['score']:.3f} | {cells} |"

    lines.append(line("best found", summary["best"]["validation"], summary["best"]["test"]))
    lines.append(
        line(
            f"default (weights {DEFAULT_WEIGHT}, densities {DEFAULT_DENSITY}, ω {DEFAULT_OMEGA})",
            summary["baseline"]["validation"],
            summary["baseline"]["test"],
        )
    )
    lines.append(line("default without AIM (configs/ties.yml)", None, plain))
    lines += [
        "",
        "Best values: " + ", ".join(f"`{key}` {value:.3g}" for key, value in summary["best"]["values"].items()),
        "",
        "| workers | CPUs per trial | wall time (s) | trials finished | mean merge (s) | mean eval (s) |",
        "|---|---|---|---|---|---|",
    ]
    for count in workers:
        wall, run_summary, rows = runs[count]
        merge_s = sum(float(row["merge_s"]) for row in rows) / len(rows)
        eval_s = sum(float(row["eval_s"]) for row in rows) / len(rows)
        lines.append(
            f"| {count} | {CORES // count} | {wall:.0f} | {run_summary['finished']} | {merge_s:.2f} | {eval_s:.2f} |"
        )
    if len(workers) == 2:
        lines += [
            "",
            f"2 workers take {runs[workers[1]][0] / runs[workers[0]][0]:.2f}× the wall time of 1 "
            "worker (side by side, same recipe and seed).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="a micro zoo folder (mergewise zoo build)")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--limit", type=int, default=50, help="validation prompts per task and trial")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--workdir", type=Path, default=WORK / "search")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    zoo = args.zoo.resolve()
    runs = {
        count: run_search(
            search_recipe(zoo, args.trials, CORES // count, args.limit), args.workdir / f"workers-{count}"
        )
        for count in args.workers
    }
    objective = search_recipe(zoo, 1, 1, args.limit)["search"]["objective"]
    plain = plain_ties_test_scores(zoo, args.workdir, objective)
    text = report(zoo, runs, plain, args.trials, args.limit)
    write_result(args.results / "search-micro.md", text)
    shutil.copyfile(
        args.workdir / f"workers-{max(args.workers)}" / "out" / "search.png", args.results / "search-micro.png"
    )
    print(text)


if __name__ == "__main__":
    main()
