"""Mediator on a zoo: quality against memory for every residual code, routing, and serving.

    python benchmarks/mediator.py --zoo /path/to/micro-zoo [--limit 100]

For every (recipe dtype, residual code, memory budget) it builds a Mediator model from the zoo's
experts (each build a child process, so its peak RSS is its own), scores it with `mergewise eval`,
and puts it next to the experts (the oracle: each on its own task), the core merges and the dense
model. A setting whose budget is too small for its code is reported as such. Then, for the default
settings in bf16, it serves a selected expert side by side with the same expert exported as a plain
model: `generate()` latency in one process (the same prompt again and again, then prompts of two
experts in turn, so that every request switches), peak RSS of load + generate, and the cost of one route
switch (the routed tensors rewritten in place, and D restored from the folder). `--serving-only`
measures that part again and replaces it in the existing report.

Writes benchmarks/results/mediator-<size>.md and mediator-<size>.png (quality against stored size,
one line per code). Builds and scores are cached under --work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import RESULTS, mergewise_command, run_measured, write_result
from workloads import MEDIATOR_DEFAULT, build_mediator, mediator_folder

from mergewise.evaluate.comparison import Entry, score_entries, zoo_entries
from mergewise.layerwise import native_half_matmuls
from mergewise.zoo.manifest import Zoo, load_zoo

CORE_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
CODES = ["auto", "sign1", "sign2", "sparse", "lowrank", "lowrank4"]


def label_of(dtype: str, code: str, budget: float) -> str:
    return f"mediator {dtype} {code} b={budget:g}"


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


LATENCY_CHILD = """
import statistics, sys, time, json, torch
from mergewise.mediator.runtime import load
mediator_dir, plain_dir, prompt, other, tokens, repeats, threads = sys.argv[1:5] + [int(arg) for arg in sys.argv[5:8]]
if threads:  # 0: torch's default, as `mergewise generate` runs
    torch.set_num_threads(threads)
mediator, plain = load(mediator_dir), load(plain_dir)
first = time.perf_counter(); [(_, route)] = mediator.generate_text([prompt], max_new_tokens=tokens)
first = time.perf_counter() - first
times = {"mediator": [], "plain": [], "mediator_changing": [], "plain_changing": []}
pair_ratios = {"same": [], "changing": []}
def timed_pair(mediator_first, text, names):  # both models on one prompt, back to back
    pair = [(names[0], mediator), (names[1], plain)]
    for name, model in (pair if mediator_first else pair[::-1]):
        start = time.perf_counter(); model.generate_text([text], max_new_tokens=tokens, min_new_tokens=tokens)
        times[name].append(time.perf_counter() - start)
    return times[names[0]][-1] / times[names[1]][-1]
for index in range(repeats):
    pair_ratios["same"].append(timed_pair(index % 2, prompt, ("mediator", "plain")))
for index in range(2 * repeats):  # every Mediator request routes to another expert than the one before
    pair_ratios["changing"].append(timed_pair(index // 2 % 2, prompt if index % 2 else other,
                                              ("mediator_changing", "plain_changing")))
[(_, other_route)] = mediator.generate_text([other], max_new_tokens=1)
switches = {}
fused_by_size = mediator.fused_switches
for fused in (fused_by_size, not fused_by_size):  # the path this size takes first, then the other one
    mediator.fused_switches = fused
    mediator.use_weights({route.task: 1.0}); mediator.use_weights({})  # loads the kernels
    for _ in range(repeats):  # one route switch: D -> D + decode(r_t) in place, then D again
        for step, mix in (("select", {route.task: 1.0}), ("restore", {})):
            start = time.perf_counter(); mediator.use_weights(mix)
            switch = f"switch_{step}" + ("_fused" if fused else "_torch")
            switches.setdefault(switch, []).append(time.perf_counter() - start)
routed = sum(m.numel() * m.element_size() for m in mediator._routed.values())
print(json.dumps({"threads": torch.get_num_threads(), "route": route.to_json(),
                  "other_route": other_route.to_json(), "first": first,
                  "routed_bytes": routed, "fused_by_size": fused_by_size,
                  "ratio": statistics.median(pair_ratios["same"]),
                  "changing_ratio": statistics.median(pair_ratios["changing"]),
                  **{name: statistics.median(values) for name, values in times.items()},
                  **{name: statistics.median(values) for name, values in switches.items()}}))
"""


def serving(mediator_dir: Path, zoo: Zoo, work: Path, tokens: int, repeats: int, threads: list[int]) -> dict:
    """Selected-expert generate() vs the same expert exported as a plain model (one process per thread
    count), the cost of a route switch, and the peak RSS of load + generate of each."""
    from mergewise.mediator.export import export_task

    task, other_task = [name for name, entry in zoo.tasks.items() if entry.expert][:2]
    prompt, other = zoo.eval_examples(task)[0]["prompt"], zoo.eval_examples(other_task)[0]["prompt"]
    plain = work / "models" / f"export-{task}"
    if not (plain / "config.json").is_file():
        export_task(mediator_dir, task, plain, overwrite=True, quiet=True)
    timings = []
    for count in threads:
        output = subprocess.run(
            [
                sys.executable,
                "-c",
                LATENCY_CHILD,
                str(mediator_dir),
                str(plain),
                prompt,
                other,
                str(tokens),
                str(repeats),
                str(count),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        timings.append(json.loads(output.strip().splitlines()[-1]))
    memory = {
        name: run_measured(
            mergewise_command("generate", str(folder), "--prompt", prompt, "--max-new-tokens", str(tokens))
        ).peak_rss_mib
        for name, folder in (("mediator", mediator_dir), ("plain", plain))
    }
    return {"task": task, "timings": timings, "rss": memory}


SERVING_HEADING = "## Serving"


def serving_sections(folder: Path, zoo: Zoo, work: Path, args: argparse.Namespace) -> list[str]:
    """One serving section per `--tokens` count: routing costs one prefill per request, so its share
    of a request depends on how many tokens the request generates."""
    return [
        line
        for tokens in args.tokens
        for line in serving_section(
            serving(folder, zoo, work, tokens, args.repeats, args.threads), tokens, args.repeats
        )
    ]


def serving_section(measured: dict, tokens: int, repeats: int) -> list[str]:
    timing = measured["timings"][0]
    gigabytes = timing["routed_bytes"] / 1e9
    dtype, code, budget = MEDIATOR_DEFAULT
    lines = [
        "",
        f"{SERVING_HEADING} ({dtype}, code {code}, budget {budget:g}, {tokens} new tokens)",
        "",
        f"`generate()` of {tokens} new tokens for one `{measured['task']}` prompt (route: "
        f"{timing['route']['decision']} {timing['route']['task']}), median of {repeats}, one process per thread "
        "count (the last: torch's default, as `mergewise generate` runs). The two models take turns on the same "
        "prompt, back to back, which of them goes first alternating; the latency ratio is the median of those "
        "pairs' ratios (the machine's speed drifts between pairs):",
        "",
        "| torch threads | Mediator, selected expert | same expert exported as a plain model | latency | "
        "first request | every request changing expert |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in measured["timings"]:
        lines.append(
            f"| {run['threads']} | {1000 * run['mediator']:.1f} ms | {1000 * run['plain']:.1f} ms | "
            f"**{run['ratio']:.2f}×** | {1000 * run['first']:.1f} ms | "
            f"{run['changing_ratio']:.2f}× |"
        )
    rss = measured["rss"]
    lines += [
        "",
        f"Peak RSS of `mergewise generate` (load + generate) in a child process each: Mediator "
        f"{rss['mediator']:.0f} MiB, plain model {rss['plain']:.0f} MiB, "
        f"**{rss['mediator'] / rss['plain']:.2f}×**.",
        "",
        "The selected expert stays in the routed tensors between requests (routing reads D's values one "
        "decoder layer at a time), so these requests after the first switch nothing. In the last column every "
        f"request goes to another expert (`{measured['task']}` and `{timing['other_route']['task']}` prompts "
        f"in turn, route of the second: {timing['other_route']['decision']}; the plain model runs the same prompts).",
        "",
        f"Route switch ({timing['routed_bytes'] / 1e6:.1f} MB of routed weights, median of {repeats}, "
        f"{timing['threads']} thread(s); this size switches with "
        f"{'the fused kernels' if timing['fused_by_size'] else 'torch operations'}):",
        "",
    ]
    for path, label in (("torch", "torch operations"), ("fused", "fused CPU kernels")):
        select, restore = timing[f"switch_select_{path}"], timing[f"switch_restore_{path}"]
        lines.append(
            f"- {label}: select {1000 * select:.2f} ms ({1000 * select / gigabytes:.0f} ms/GB), "
            f"restore D {1000 * restore:.2f} ms ({1000 * restore / gigabytes:.0f} ms/GB)"
        )
    return lines


def serving_only(zoo: Zoo, work: Path, args: argparse.Namespace) -> None:
    """Measure serving again for the default build and replace that section of the zoo's report,
    leaving the quality table (whose builds and scores take far longer) as it is."""
    report = RESULTS / f"mediator-{zoo.raw.get('size', 'zoo')}.md"
    if not report.is_file():
        sys.exit(f"{report} does not exist yet: run the whole benchmark once")
    folder, record = build_mediator(zoo, work, *MEDIATOR_DEFAULT)
    if "error" in record:
        sys.exit(f"the default settings do not build on this zoo: {record['error']}")
    kept = report.read_text().split(f"\n{SERVING_HEADING}")[0].rstrip("\n").splitlines()
    lines = kept + serving_sections(folder, zoo, work, args)
    write_result(report, "\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({point["dtype"] for point in points})
    figure, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.5), squeeze=False)
    for axis, dtype in zip(axes[0], dtypes):
        for code in CODES:
            line = sorted((p for p in points if p["dtype"] == dtype and p["code"] == code), key=lambda p: p["ratio"])
            if line:
                axis.plot([p["ratio"] for p in line], [100 * p["kept"] for p in line], marker="o", label=code)
        axis.axhline(95, color="grey", linestyle="--", linewidth=0.8, label="95% of the experts")
        axis.set_xlabel("stored size / one model")
        axis.set_ylabel("mean % of each expert's own score")
        axis.set_title(f"{title} ({dtype} recipe)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: ZOO/mediator-bench)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.1, 1.25, 1.5, 2.0])
    parser.add_argument("--codes", nargs="+", default=CODES, choices=CODES)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--limit", type=int, default=None, help="prompts per task")
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[32],
        help="new tokens per timed generate() (several: one serving section each)",
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 0],
        help="torch threads of the timed requests, one process each (0: torch's default)",
    )
    parser.add_argument(
        "--serving-only",
        action="store_true",
        help="measure serving of the default settings again, keeping the report's quality table",
    )
    args = parser.parse_args()
    zoo = load_zoo(args.zoo)
    work = args.work or args.zoo / "mediator-bench"
    if args.serving_only:
        serving_only(zoo, work, args)
        return
    entries = zoo_entries(zoo, CORE_METHODS)
    builds = {}
    for dtype in args.dtypes:
        for code in args.codes:
            for budget in args.budgets:
                folder, record = build_mediator(zoo, work, dtype, code, budget)
                builds[dtype, code, budget] = record
                if "error" not in record:
                    entries.append(Entry(label_of(dtype, code, budget), lambda _, f=folder: f))
    results = score_entries(args.zoo, work, entries, limit=args.limit)
    experts = [name for name, task in zoo.tasks.items() if task.expert]
    held = [name for name, task in zoo.tasks.items() if not task.expert]
    dense = results["linear"]  # the dense expert D is this average of the experts (float32 recipe)
    size = zoo.raw.get("size", "zoo")
    header = (
        "| model | " + " | ".join(zoo.tasks) + " | % of expert kept (mean) | routing correct | "
        "held-back blend+dense | stored / one model | codes (units) | build peak RSS |"
    )
    lines = [
        f"# Mediator on the {size} zoo",
        "",
        f"Experts: {', '.join(experts)}; held-back task: {', '.join(held) or 'none'}. "
        f"{args.limit or 'all'} prompts per task. Merge of calm units and dense expert D: linear average. "
        "Routing correct: share of in-distribution prompts whose most probable expert is their own. "
        "The router's features on this machine: bf16 Linear layers multiply "
        f"{'natively (the CPU has AVX-512 BF16)' if native_half_matmuls(torch.bfloat16) else 'in float32'}.",
        "",
        header,
        "|" + "---|" * (len(zoo.tasks) + 7),
    ]
    points = []
    for label, result in results.items():
        cells = [f"{result['tasks'][name]['score']:.3f}" for name in zoo.tasks]
        routing, ratio, rss, codes = result.get("routing"), "1.000", "", ""
        if label.startswith("mediator"):
            _, dtype, code, budget = label.split()
            record = builds[dtype, code, float(budget[2:])]
            manifest = record["manifest"]
            ratio = f"{manifest['memory']['ratio']:.3f}"
            rss = f"{record['peak_rss_mib']:.0f} MiB"
            used: dict[str, int] = {}
            for unit in manifest["units"]:
                if unit["routed"]:
                    used[unit["code"]] = used.get(unit["code"], 0) + 1
            codes = ", ".join(f"{name} {count}" for name, count in used.items()) + f" of {len(manifest['units'])}"
            points.append(
                {
                    "dtype": dtype,
                    "code": code,
                    "budget": float(budget[2:]),
                    "ratio": manifest["memory"]["ratio"],
                    "kept": kept_share(result, results, zoo),
                }
            )
        correct = f"{statistics.mean(routing[name]['correct'] for name in experts):.3f}" if routing else ""
        flagged = (
            f"{statistics.mean(routing[name]['blend'] + routing[name]['dense'] for name in held):.3f}"
            if routing and held
            else ""
        )
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {100 * kept_share(result, results, zoo):.1f}% | "
            f"{correct} | {flagged} | {ratio} | {codes} | {rss} |"
        )
    refused = [(key, record["error"]) for key, record in builds.items() if "error" in record]
    if refused:
        lines += ["", "Settings refused at build time:", ""]
        lines += [f"- {label_of(*key)}: {error}" for key, error in refused]
    if held:
        lines += [
            "",
            "Held-back task, dense model D (float32 linear average): "
            + ", ".join(f"{name} {dense['tasks'][name]['score']:.3f}" for name in held),
        ]
    default_dir = mediator_folder(work, *MEDIATOR_DEFAULT)
    if (default_dir / "mediator" / "mediator.json").is_file():
        lines += serving_sections(default_dir, zoo, work, args)
    write_result(RESULTS / f"mediator-{size}.md", "\n".join(lines) + "\n")
    plot(points, RESULTS / f"mediator-{size}.png", f"Mediator, {size} zoo")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
