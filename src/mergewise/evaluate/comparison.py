"""Score merge methods side by side on a zoo: the base, each expert, and one merge per recipe.

Shared by `mergewise demo` and `benchmarks/quality.py`; merges and scores are cached in a work
folder so a rerun only does what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergewise.checkpoint.files import read_json
from mergewise.evaluate.zoo_eval import evaluate_model
from mergewise.zoo.manifest import Zoo

# Settings a practitioner would start from on a handful of full fine-tunes of one base.
CORE_METHOD_SETTINGS: dict[str, dict] = {
    "linear": {"per_model": {"weight": 1.0}},
    "task_arithmetic": {"per_model": {"weight": 0.5}},
    "ties": {"per_model": {"weight": 1.0, "density": 0.5}},
    "dare_ties": {"per_model": {"weight": 1.0, "density": 0.5}},
    "breadcrumbs": {"per_model": {"weight": 0.5, "density": 0.5, "gamma": 0.01}},
    "della": {"per_model": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}},
}


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: a label and how to produce its model folder."""

    label: str
    produce: Callable[[Path], Path]  # given the work folder, return the model folder (made if missing)


def core_recipe(zoo: Zoo, method: str, dtype: str = "float32") -> dict:
    """A mergekit-style recipe merging every expert of `zoo` with `method`'s starting settings
    (linear averages the experts only: the base is an input there, so it gets weight 0)."""
    settings = CORE_METHOD_SETTINGS[method]
    models = [
        {"model": str(task.expert), "parameters": dict(settings["per_model"])}
        for task in zoo.tasks.values()
        if task.expert
    ]
    if method == "linear":
        models.append({"model": str(zoo.base), "parameters": {"weight": 0.0}})
    return {"merge_method": method, "base_model": str(zoo.base), "dtype": dtype, "models": models}


def mediator_recipe(zoo: Zoo, dtype: str = "float32", **settings: Any) -> dict:
    """A Mediator recipe over every expert of `zoo`, each with its task's calibration prompts;
    `settings` (memory_budget, code, …) go into the mediator block, the rest keep their defaults."""
    experts = [
        {"model": str(task.expert), "task": name, "prompts": str(task.calibration)}
        for name, task in zoo.tasks.items()
        if task.expert
    ]
    return {
        "merge_method": "linear",
        "base_model": str(zoo.base),
        "dtype": dtype,
        "mediator": {**settings, "experts": experts},
    }


def mediator_entry(zoo: Zoo) -> Entry:
    """A Mediator model of the zoo's experts with the default settings, built into work/models on first use."""

    def produce(work: Path) -> Path:
        out = work / "models" / "mediator"
        if not (out / "mediator" / "mediator.json").is_file():
            from mergewise.mediator.build import build

            build(mediator_recipe(zoo), out, quiet=True, seed=0, overwrite=True)
        return out

    return Entry("mediator", produce)


def _existing(folder: Path) -> Callable[[Path], Path]:
    """The producer of a model that exists already."""
    return lambda work: folder


def merged_entry(label: str, recipe: dict, merge: Callable[[dict, Path], Path] | None = None) -> Entry:
    """An entry whose model is `recipe` merged (by `merge`, default the plain engine) into work/label."""

    def produce(work: Path) -> Path:
        out = work / "models" / label
        if not (out / "config.json").is_file():
            if merge is None:
                from mergewise.engine import run_merge

                run_merge(recipe, out, quiet=True, seed=0, overwrite=True)
            else:
                merge(recipe, out)
        return out

    return Entry(label, produce)


def zoo_entries(zoo: Zoo, methods: list[str]) -> list[Entry]:
    """Base, every expert, then each core method."""
    entries = [Entry("base", _existing(zoo.base))]
    for task in zoo.tasks.values():
        if task.expert:
            entries.append(Entry(f"expert:{task.name}", _existing(task.expert)))
    entries += [merged_entry(method, core_recipe(zoo, method)) for method in methods]
    return entries


def score_entries(
    zoo_dir: str | Path,
    work: str | Path,
    entries: list[Entry],
    *,
    device: str = "cpu",
    limit: int | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Evaluate every entry (cached in work/scores/LABEL.json) and return label → eval JSON."""
    work = Path(work)
    (work / "scores").mkdir(parents=True, exist_ok=True)
    results = {}
    for entry in entries:
        cache = work / "scores" / f"{entry.label.replace(':', '-')}.json"
        if cache.is_file():
            results[entry.label] = read_json(cache, "cached scores", finite=False)
            continue
        progress(f"scoring {entry.label}")
        results[entry.label] = evaluate_model(entry.produce(work), zoo_dir, device=device, limit=limit)
        cache.write_text(json.dumps(results[entry.label], indent=2))
    return results


def _column(zoo: Zoo, name: str) -> str:
    task = zoo.tasks[name]
    metric = "EM" if task.metric == "exact_match" else "answer NLL"
    return f"{name} {metric}" + ("" if task.expert else " (no expert)")


def markdown_table(results: dict[str, dict], zoo: Zoo) -> str:
    """Each task's score (held-back task marked), mean over the expert tasks, general NLL."""
    tasks = list(zoo.tasks)
    expert_tasks = [name for name, task in zoo.tasks.items() if task.expert]
    header = ["model", *[_column(zoo, name) for name in tasks], "mean (expert tasks)", "general NLL"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, result in results.items():
        scores = [result["tasks"][name]["score"] for name in tasks]
        mean = sum(result["tasks"][name]["score"] for name in expert_tasks) / len(expert_tasks)
        cells = [label, *[f"{score:.3f}" for score in scores], f"{mean:.3f}", f"{result['general']['score']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(results: dict[str, dict], zoo: Zoo, path: str | Path) -> None:
    """Grouped bars: one group per task, one bar per model."""
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: the process's backend stays as it is

    tasks = list(zoo.tasks)
    width = 0.8 / max(len(results), 1)
    figure = Figure(figsize=(max(8, 1.6 * len(tasks) + 0.3 * len(results)), 4.5))
    axis = figure.subplots()
    palette = matplotlib.colormaps["tab20"]  # qualitative: its N colours, each picked by its index
    for index, (label, result) in enumerate(results.items()):
        positions = [task_index + index * width for task_index in range(len(tasks))]
        axis.bar(
            positions,
            [result["tasks"][name]["score"] for name in tasks],
            width,
            label=label,
            color=palette(index % palette.N),
        )
    axis.set_xticks([task_index + 0.4 - width / 2 for task_index in range(len(tasks))])
    axis.set_xticklabels([_column(zoo, name).replace(" (", "\n(") for name in tasks])
    exact_match = all(zoo.tasks[name].metric == "exact_match" for name in tasks)
    axis.set_ylabel("exact match" if exact_match else "score (EM: higher is better; NLL: lower)")
    if exact_match:
        axis.set_ylim(0, 1.05)
    axis.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axis.set_title(f"{zoo.raw.get('size', '')} zoo: score per task")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
