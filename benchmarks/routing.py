"""Mediator's routing on zoos built with several seeds: does the uncertainty rule carry over?

    python benchmarks/routing.py --zoos ZOO [ZOO ...] [--gsm8k ../shared/data/gsm8k/train.jsonl] [--limit 100]
                                 [--router-kinds gaussian discriminative]

For each zoo (micro zoos built with `mergewise zoo build --seed N`, and the small zoo) and each recipe
dtype (bf16, float32), it builds Mediator at the default settings with each router kind of
`--router-kinds` (default: the default kind), a row each, and tabulates, on each task's
held-out eval prompts:
- in-distribution routing: per expert task, the share of its prompts *selected* to its own expert
  (the share whose most probable expert is its own, in brackets);
- false OOD: the share of in-distribution prompts flagged (blend or dense);
- the held-back task (a task with no expert): the share flagged, and Mediator's score on it against D
  (the float32 linear average of the experts);
- far OOD: how many prompts of another domain are selected (GSM8K questions, and Python source lines
  from the standard library, 3 at a time; a domain the zoo has a task of is left out);
- the quality kept (mean share of each expert's own score), and the build's own estimate of the
  shares selected to their own expert and flagged (from its held-out calibration prompts, as
  mediator.json records it).

Writes benchmarks/results/routing.md. Builds and scores are cached under each ZOO/mediator-bench (the
folder benchmarks/mediator.py uses).
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from common import RESULTS, write_report
from mediator import kept_share
from workloads import MEDIATOR_DEFAULT, build_mediator

import mergewise
from mergewise.evaluate.comparison import Entry, score_entries, zoo_entries
from mergewise.mediator.settings import RouterSettings
from mergewise.zoo.manifest import load_zoo

_, CODE, BUDGET = MEDIATOR_DEFAULT
DTYPES = ("bfloat16", "float32")
FAR_OOD_PROMPTS = 100


def code_prompts(count: int) -> list[str]:
    """Python source, 3 lines at a time, from modules of the standard library (offline, fixed)."""
    import json.encoder
    import textwrap as wrapping

    lines = [
        line for module in (json.encoder, wrapping) for line in inspect.getsource(module).splitlines() if line.strip()
    ]
    return ["\n".join(lines[start : start + 3]) for start in range(0, 3 * count, 3)][:count]


def gsm8k_prompts(path: Path | None, count: int) -> list[str]:
    if path is None or not path.is_file():
        return []
    with path.open(encoding="utf-8") as file:
        return [json.loads(line)["question"] for _, line in zip(range(count), file)]


def routes_of(routed, prompts: list[str]) -> list:
    return [route for route in routed.route_texts(prompts) if route is not None]


def zoo_rows(zoo_dir: Path, far: dict[str, list[str]], limit: int | None, kinds: list[str]) -> list[dict]:
    zoo = load_zoo(zoo_dir)
    work = zoo_dir / "mediator-bench"
    entries = zoo_entries(zoo, ["linear"])
    folders = {}
    for kind in kinds:
        for dtype in DTYPES:
            folder, record = build_mediator(zoo, work, dtype, CODE, BUDGET, kind)
            if "error" in record:
                raise SystemExit(f"{zoo_dir}: Mediator {dtype} refused: {record['error']}")
            folders[dtype, kind] = folder
            entries.append(Entry(folder.name, lambda _, f=folder: f))
    results = score_entries(zoo_dir, work, entries, limit=limit)
    experts = [name for name, task in zoo.tasks.items() if task.expert]
    held = [name for name, task in zoo.tasks.items() if not task.expert]
    # a domain the zoo has a task of (the small zoo's gsm8k and code) is not far from it
    far_domains = {domain: texts for domain, texts in far.items() if texts and domain not in zoo.tasks}
    rows = []
    prompts = {name: [example["prompt"] for example in zoo.eval_examples(name)[:limit]] for name in zoo.tasks}
    for (dtype, _), folder in folders.items():
        routed = mergewise.load(folder)
        routes = {name: routes_of(routed, prompts[name]) for name in zoo.tasks}
        own = {
            name: sum(r.decision == "select" and r.task == name for r in routes[name]) / len(routes[name])
            for name in experts
        }
        top = {
            name: sum(max(r.probs, key=r.probs.get) == name for r in routes[name]) / len(routes[name])
            for name in experts
        }
        in_distribution = [r for name in experts for r in routes[name]]
        result = results[folder.name]
        manifest = json.loads((folder / "mediator" / "mediator.json").read_text())
        rows.append(
            {
                "zoo": f"{zoo.raw.get('size', 'zoo')} seed {zoo.raw.get('seed', '?')}",
                "dtype": dtype,
                "router": manifest["router"]["settings"]["kind"],
                "own": own,
                "top": top,
                "false_ood": sum(r.decision != "select" for r in in_distribution) / len(in_distribution),
                "held": {
                    name: {
                        "flagged": sum(r.decision != "select" for r in routes[name]) / len(routes[name]),
                        "mediator": result["tasks"][name]["score"],
                        "dense": results["linear"]["tasks"][name]["score"],
                        "metric": zoo.tasks[name].metric,
                    }
                    for name in held
                },
                "far": {
                    domain: sum(r.decision == "select" for r in routes_of(routed, texts))
                    for domain, texts in far_domains.items()
                },
                "far_count": {domain: len(texts) for domain, texts in far_domains.items()},
                "kept": kept_share(result, results, zoo),
                "estimate": {
                    "own": manifest["router_fit"]["heldout_own_selected"],
                    "flagged": manifest["router_fit"]["heldout_flagged"],
                },
            }
        )
        del routed
    return rows


def percent(share: float) -> str:
    return f"{100 * share:.0f}%"


def render(rows: list[dict]) -> str:
    lines = [
        f"Default settings (code `{CODE}`, memory budget {BUDGET:g}), one row per zoo build and recipe dtype.",
        "Own: the share of each expert task's held-out prompts selected to its own expert (in brackets: the",
        "share whose most probable expert is its own). False OOD: in-distribution prompts flagged (blend or",
        "dense). Held-back: the task with no expert, the share flagged, and Mediator's score against D's",
        "(the float32 linear average; higher is better for exact match). Far OOD: prompts of another domain",
        "selected to an expert (a target of 0). Kept: mean share of each expert's own score. The build's",
        "estimate: the same shares on its own held-out calibration prompts, as mediator.json records them.",
        "",
        "| zoo | dtype | router | own (top) per task | worst own | false OOD | held-back flagged | "
        "held-back score, Mediator / D | far OOD selected | kept | build's estimate: own / flagged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        own = ", ".join(f"{name} {percent(share)} ({percent(row['top'][name])})" for name, share in row["own"].items())
        held = "; ".join(f"{name} {percent(h['flagged'])}" for name, h in row["held"].items()) or "-"
        scores = "; ".join(f"{name} {h['mediator']:.3f} / {h['dense']:.3f}" for name, h in row["held"].items()) or "-"
        far = ", ".join(f"{domain} {count}/{row['far_count'][domain]}" for domain, count in row["far"].items()) or "-"
        lines.append(
            f"| {row['zoo']} | {row['dtype']} | {row['router']} | {own} | {percent(min(row['own'].values()))} | "
            f"{percent(row['false_ood'])} | {held} | {scores} | {far} | {percent(row['kept'])} | "
            f"{percent(row['estimate']['own'])} / {percent(row['estimate']['flagged'])} |"
        )
    kinds = list(dict.fromkeys(row["router"] for row in rows))
    lines += ["", "Rows meeting each target, per router:", "", "| target | " + " | ".join(kinds) + " |"]
    lines.append("|---|" + "---|" * len(kinds))
    for name, met in TARGETS.items():
        counts = [[met(row) for row in rows if row["router"] == kind] for kind in kinds]
        lines.append(f"| {name} | " + " | ".join(f"{sum(c)} of {len(c)}" for c in counts) + " |")
    return "\n".join(lines) + "\n"


def _scores_at_least_dense(held: dict) -> bool:
    return (held["mediator"] >= held["dense"]) if held["metric"] != "nll" else (held["mediator"] <= held["dense"])


TARGETS = {  # #33's targets, each a test of one row
    "each task selects >= 95 % of its own prompts": lambda row: min(row["own"].values()) >= 0.95,
    "held-back flagged >= 80 %": lambda row: all(h["flagged"] >= 0.8 for h in row["held"].values()),
    "held-back: Mediator scores >= D": lambda row: all(map(_scores_at_least_dense, row["held"].values())),
    "false OOD <= 5 %": lambda row: row["false_ood"] <= 0.05,
    "0 far-OOD prompts selected": lambda row: all(count == 0 for count in row["far"].values()),
    "quality kept >= 95 %": lambda row: row["kept"] >= 0.95,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoos", type=Path, nargs="+", required=True)
    parser.add_argument("--gsm8k", type=Path, default=None, help="GSM8K train JSONL: far-OOD questions")
    parser.add_argument("--limit", type=int, default=100, help="eval prompts per task")
    parser.add_argument("--out", type=Path, default=RESULTS / "routing.md")
    parser.add_argument(
        "--router-kinds",
        nargs="+",
        default=[RouterSettings().kind],
        help="router kinds to build Mediator with, a row each (default: the default kind)",
    )
    args = parser.parse_args()
    far = {"gsm8k": gsm8k_prompts(args.gsm8k, FAR_OOD_PROMPTS), "code": code_prompts(FAR_OOD_PROMPTS)}
    rows = [row for zoo_dir in args.zoos for row in zoo_rows(zoo_dir, far, args.limit, args.router_kinds)]
    write_report(args.out, "Mediator's routing across zoo builds", render(rows), None)
    (args.out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
