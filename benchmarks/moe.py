"""`mergewise moe` beside mergekit-moe, Mediator and the static merges: quality, routing, memory, speed.

    python benchmarks/moe.py --zoo /path/to/micro-zoo [--limit 100] [--rounds 5]

On a zoo, each tool builds a Mixtral-style model whose experts are the zoo's experts, with the same
prompts per expert (the expert task's calibration prompts): mergekit-moe 0.1.5 (`hidden` gates),
`mergewise moe` with `hidden` gates and with `mediator` gates. Each is scored with `mergewise eval`
next to the experts, the base, the core merges and Mediator at its defaults, and:

- routing: the share of each expert task's held-out prompts (its eval prompts, never seen by a
  build) that each layer's router sends to the task's own expert, read from the built model's router
  logits in transformers (a prompt goes to the expert of highest probability averaged over its tokens);
- stored bytes, build time and build peak RSS, peak RSS of `mergewise generate` answering one prompt.

Then build speed and memory on W1's files (`vs_mergekit.py`: a ~207 M-parameter bf16 Llama and three
fine-tunes as experts): mergekit-moe against `mergewise moe`, `--rounds` rounds with the tools taking
turns, the page cache written back (`sync`) before each run. mergewise's time includes flushing its
output to disk before moving it into place; mergekit-moe leaves its output in the page cache.

Writes moe-<size>.md and moe-<size>.png (routing share per layer) into --results (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

import torch
import yaml
from common import RESULTS, WORK, comparison_table, mergewise_command, repeated, run_measured, write_report
from workloads import MEDIATOR_DEFAULT, LlamaShape, build_mediator, build_workload

from mergewise.evaluate.comparison import Entry, score_entries, zoo_entries
from mergewise.zoo.manifest import Zoo, load_zoo

CORE_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
MOE_BUILDS = {  # label → (tool, gate mode)
    "moe mergekit hidden": ("mergekit", "hidden"),
    "moe mergewise hidden": ("mergewise", "hidden"),
    "moe mergewise mediator": ("mergewise", "mediator"),
}
HELD_OUT_PROMPTS = 100  # per expert task
W1_PROMPTS = [  # three experts' prompts on the W1 build (random weights: what they say does not matter)
    ["Solve for x: 3x + 4 = 10", "What is 12 times 7?"],
    ["def add(a, b): return", "Write a Python function that sorts a list"],
    ["Hello! How are you today?", "Tell me about your weekend"],
]


def expert_tasks(zoo: Zoo) -> list[str]:
    return [name for name, task in zoo.tasks.items() if task.expert]


def moe_recipe(zoo: Zoo, gate_mode: str) -> dict:
    experts = []
    for name in expert_tasks(zoo):
        task = zoo.tasks[name]
        prompts = [line for line in task.calibration.read_text().splitlines() if line.strip()]
        experts.append({"source_model": str(task.expert), "positive_prompts": prompts})
    return {"base_model": str(zoo.base), "gate_mode": gate_mode, "experts": experts}


def mergekit_moe_command(recipe: Path, out: Path) -> list[str]:
    return ["mergekit-moe", str(recipe), str(out), "--device", "cpu", "--random-seed", "0"]


def build_moe_model(work: Path, zoo: Zoo, label: str) -> tuple[Path, dict]:
    """The zoo's MoE model for one build, made once by a measured run of its tool; and its record."""
    tool, mode = MOE_BUILDS[label]
    out = work / "models" / label.replace(" ", "-")
    record_path = work / "builds" / f"{out.name}.json"
    if not record_path.is_file():
        recipe = work / "recipes" / f"{out.name}.yml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(yaml.safe_dump(moe_recipe(zoo, mode), sort_keys=False))
        if tool == "mergekit":
            command = mergekit_moe_command(recipe, out)
        else:
            command = mergewise_command("moe", str(recipe), str(out), "--overwrite", "--quiet")
        subprocess.run(["sync"], check=True)
        measured = run_measured(command)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps({"seconds": measured.wall_s, "peak_rss_mib": measured.peak_rss_mib}))
    return out, json.loads(record_path.read_text())


def held_out_prompts(zoo: Zoo) -> dict[str, list[str]]:
    prompts = {}
    for name in expert_tasks(zoo):
        rows = [json.loads(line) for line in zoo.tasks[name].eval.read_text().splitlines() if line.strip()]
        prompts[name] = [row["prompt"] for row in rows[:HELD_OUT_PROMPTS]]
    return prompts


@torch.inference_mode()
def routing_shares(folder: Path, prompts: dict[str, list[str]]) -> list[float]:
    """Per layer, the share of held-out prompts whose router sends them to their task's expert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hits: list[list[bool]] = []
    for expert, texts in enumerate(prompts.values()):
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")
            logits = model(**ids, output_router_logits=True).router_logits
            hits.append([int(torch.softmax(layer.float(), -1).mean(0).argmax()) == expert for layer in logits])
    return [statistics.mean(column) for column in zip(*hits)]


def cached(path: Path, compute):
    """`compute()`'s JSON value, kept at `path` for the next run."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*.safetensors"))


def serving_peak_mib(folder: Path, prompt: str) -> float:
    return run_measured(
        mergewise_command("generate", str(folder), "--prompt", prompt, "--max-new-tokens", "8")
    ).peak_rss_mib


def zoo_section(zoo: Zoo, work: Path, limit: int | None) -> tuple[str, dict[str, list[float]]]:
    tasks = expert_tasks(zoo)
    builds = {label: build_moe_model(work, zoo, label) for label in MOE_BUILDS}
    mediator, mediator_record = build_mediator(zoo, work, *MEDIATOR_DEFAULT)
    entries = [
        *zoo_entries(zoo, CORE_METHODS),
        Entry("mediator", lambda _: mediator),
        *(Entry(label, lambda _, folder=folder: folder) for label, (folder, _) in builds.items()),
    ]
    scores = score_entries(zoo.root, work, entries, limit=limit)

    def goodness(label: str) -> float:  # higher is better: NLL tasks count negated
        sign = {t: -1.0 if zoo.tasks[t].metric == "nll" else 1.0 for t in tasks}
        return statistics.mean(sign[t] * scores[label]["tasks"][t]["score"] for t in tasks)

    best_static = max(CORE_METHODS, key=goodness)
    prompts = held_out_prompts(zoo)
    probe = prompts[tasks[0]][0]
    routing = {
        label: cached(work / "routing" / f"{folder.name}.json", lambda f=folder: routing_shares(f, prompts))
        for label, (folder, _) in builds.items()
    }

    header = (
        "| model | "
        + " | ".join(tasks)
        + " | mean | held-out routing, mean over layers | stored MB | build s | build peak RSS MB"
        + " | serving peak RSS MB |"
    )
    lines = [header, "|---|" + "---:|" * (len(tasks) + 6)]

    def row(label: str, shown: str, folder: Path | None, record: dict | None, shares: list[float] | None) -> str:
        values = [scores[label]["tasks"][t]["score"] for t in tasks]
        cells = [f"{v:.3f}" for v in values] + [f"{statistics.mean(values):.3f}"]
        cells.append(f"{statistics.mean(shares):.0%}" if shares else "")
        cells.append(f"{folder_bytes(folder) / 1e6:.1f}" if folder else "")
        cells.append(f"{record['seconds']:.1f}" if record and "seconds" in record else "")
        cells.append(f"{record['peak_rss_mib']:.0f}" if record and "peak_rss_mib" in record else "")
        serving = (
            cached(work / "serving" / f"{label.replace(':', '-')}.json", lambda: serving_peak_mib(folder, probe))
            if folder
            else None
        )
        cells.append(f"{serving:.0f}" if serving is not None else "")
        return f"| {shown} | " + " | ".join(cells) + " |"

    for task in tasks:
        lines.append(row(f"expert:{task}", f"expert {task}", zoo.tasks[task].expert, None, None))
    lines.append(row(best_static, f"best static merge ({best_static})", work / "models" / best_static, None, None))
    lines.append(row("mediator", "Mediator (defaults)", mediator, mediator_record, None))
    for label, (folder, record) in builds.items():
        lines.append(row(label, label, folder, record, routing[label]))
    per_layer = ["| build | " + " | ".join(f"layer {i}" for i in range(len(next(iter(routing.values()))))) + " |"]
    per_layer.append("|---|" + "---:|" * len(next(iter(routing.values()))))
    for label, shares in routing.items():
        per_layer.append(f"| {label} | " + " | ".join(f"{share:.0%}" for share in shares) + " |")
    gain = statistics.mean(routing["moe mergewise mediator"]) - statistics.mean(routing["moe mergewise hidden"])
    metrics = ", ".join(sorted({zoo.tasks[t].metric for t in tasks}))
    text = (
        f"Scores on the zoo's eval prompts ({limit or 'all'} per task; metric: {metrics}, NLL lower is better).\n\n"
        + "\n".join(lines)
        + "\n\nShare of each expert task's held-out prompts routed to its own expert, per layer:\n\n"
        + "\n".join(per_layer)
        + f"\n\n`mediator` gates route {gain * 100:+.0f} points more held-out prompts to their expert than "
        "`hidden` gates, averaged over layers (target: ≥ +15).\n"
    )
    return text, routing


def w1_recipe(workload: Path, experts: int) -> Path:
    """W1's base with its fine-tunes as `experts` experts (taken in turn when there are more experts)."""
    recipe = WORK / f"moe-w1-{experts}.yml"
    entries = [
        {"source_model": str(workload / f"ft{index % 3 + 1}"), "positive_prompts": W1_PROMPTS[index % 3]}
        for index in range(experts)
    ]
    recipe.write_text(yaml.safe_dump({"base_model": str(workload / "base"), "experts": entries}, sort_keys=False))
    return recipe


def measure_build(tool: str, recipe: Path, out: Path):
    """One build from an empty output and a page cache with nothing left to write back."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    subprocess.run(["sync"], check=True)
    if tool == "mergekit":
        return run_measured(mergekit_moe_command(recipe, out))
    return run_measured(mergewise_command("moe", str(recipe), str(out), "--quiet"))


def w1_section(rounds: int) -> str:
    workload = build_workload(WORK, LlamaShape())
    recipe = w1_recipe(workload, 3)
    out = {tool: WORK / f"moe-w1-{tool}" for tool in ("mergekit", "mergewise")}
    label = "moe (3 experts, hidden gates)"
    runs = repeated(label, ["mergekit", "mergewise"], lambda tool: measure_build(tool, recipe, out[tool]), rounds)
    same = _same_experts(out["mergekit"], out["mergewise"])
    table = comparison_table(runs, {label: same}, {label: (3.0, 0.5)})
    sizes = ["| experts | output GB | mergekit-moe peak RSS MB | mergewise peak RSS MB |", "|---:|---:|---:|---:|"]
    for experts in (3, 6):
        recipe = w1_recipe(workload, experts)
        peaks = [measure_build(tool, recipe, out[tool]).peak_rss_mib for tool in ("mergekit", "mergewise")]
        size = sum(path.stat().st_size for path in out["mergewise"].glob("*.safetensors")) / 1e9
        sizes.append(f"| {experts} | {size:.2f} | {peaks[0]:.0f} | {peaks[1]:.0f} |")
    return (
        f"W1 (~207 M-parameter bf16 Llama base, its three fine-tunes as experts), {rounds} rounds, the tools "
        f"taking turns:\n\n{table}\n\nPeak RSS against the number of experts (one build each):\n\n"
        + "\n".join(sizes)
        + "\n"
    )


def _same_experts(theirs: Path, ours: Path) -> str:
    from safetensors.torch import load_file

    names = {}
    for folder in (theirs, ours):
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(file))
        names[folder] = tensors
    experts = [name for name in names[theirs] if ".experts." in name]
    identical = all(torch.equal(names[theirs][name], names[ours][name]) for name in experts)
    return "experts identical" if identical else "experts differ"


def routing_plot(routing: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for label, shares in routing.items():
        axis.plot(range(len(shares)), [100 * share for share in shares], marker="o", label=label)
    axis.set_xlabel("layer")
    axis.set_ylabel("held-out prompts to own expert (%)")
    axis.set_ylim(0, 100)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: ZOO/moe-bench)")
    parser.add_argument("--limit", type=int, default=100, help="eval prompts per task")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the W1 build comparison (0: skip it)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the report and plot")
    args = parser.parse_args()
    zoo = load_zoo(args.zoo)
    work = args.work or args.zoo / "moe-bench"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    zoo_text, routing = zoo_section(zoo, work, args.limit)
    size = zoo.raw.get("size", "zoo")
    args.results.mkdir(parents=True, exist_ok=True)
    routing_plot(routing, args.results / f"moe-{size}.png")
    body = zoo_text + (f"\n{w1_section(args.rounds)}" if args.rounds else "")
    write_report(args.results / f"moe-{size}.md", f"mergewise moe on the {size} zoo and W1", body, None)


if __name__ == "__main__":
    main()
