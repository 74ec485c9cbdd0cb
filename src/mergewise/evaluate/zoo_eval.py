"""Score one model folder on a zoo's tasks and general text (`mergewise eval`; docs/zoo.md)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from operator import itemgetter

from mergewise.checkpoint.files import read_text
from mergewise.errors import MergewiseError
from mergewise.evaluate.loading import LoadedModel, load_model
from mergewise.evaluate.scoring import continuation_log_likelihoods, exact_match, greedy_completions, text_nll
from mergewise.mediator.runtime import RoutedModel
from mergewise.zoo.manifest import Zoo, load_zoo

GENERAL_WINDOW_TOKENS = 128
EXTRA_GENERATED_TOKENS = 2


def evaluate_model(
    model_dir: str | os.PathLike,
    zoo_dir: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    limit: int | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Per task: its metric's `score` (exact match, or answer NLL for `nll` tasks), `n` prompts and the
    per-token `answer_nll`; general: per-token NLL over `n` held-out tokens. The model folder's own
    Python runs only if `trust_remote_code`."""
    zoo = load_zoo(zoo_dir)
    selected = select_tasks(zoo, tasks)
    if batch_size < 1:
        raise MergewiseError(f"--batch-size: must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise MergewiseError(f"--limit: must be at least 1, got {limit}")
    loaded = load_model(model_dir, device, trust_remote_code=trust_remote_code)
    task_scores = {name: score_task(loaded, zoo, name, batch_size, limit) for name in selected}
    general_text = read_text(zoo.general_eval, "general evaluation text")
    window = min(GENERAL_WINDOW_TOKENS, loaded.model.config.max_position_embeddings - 1)
    general = text_nll(loaded, general_text, window, batch_size, max_windows=limit)
    results = {
        "model": str(model_dir),
        "zoo": str(zoo_dir),
        "tasks": task_scores,
        "general": {"metric": "nll", "score": round(general.mean, 4), "n": general.tokens},
    }
    if loaded.routing is not None:
        results["routing"] = {name: routing_summary(loaded.routing, zoo, name, limit) for name in selected}
        fit = (loaded.routing.manifest or {}).get("router_fit", {})
        if "heldout_flagged" in fit:  # the build's own estimate, from its held-out calibration prompts
            results["routing_estimate"] = {key: fit[key] for key in ("heldout_own_selected", "heldout_flagged")}
    return results


def routing_summary(routing: RoutedModel, zoo: Zoo, name: str, limit: int | None) -> dict:
    """How a Mediator model routed a task's prompts: the share whose most probable expert is the
    task's own (`correct`, absent for a task without an expert) and the share of each decision."""
    assert routing.router is not None  # a Mediator model's
    prompts = [example["prompt"] for example in zoo.eval_examples(name)[:limit]]
    routes = [route for route in routing.route_texts(prompts) if route is not None]  # a router routes every one
    summary = {}
    if name in routing.router.tasks:
        top = [max(route.probs.items(), key=itemgetter(1))[0] for route in routes]
        summary["correct"] = round(sum(task == name for task in top) / len(routes), 4)
        own = sum(route.decision == "select" and route.task == name for route in routes)
        summary["own_selected"] = round(own / len(routes), 4)
    for decision in ("select", "blend", "dense"):
        summary[decision] = round(sum(route.decision == decision for route in routes) / len(routes), 4)
    return summary


def select_tasks(zoo: Zoo, tasks: Sequence[str] | None) -> list[str]:
    if not tasks:
        return list(zoo.tasks)
    unknown = [name for name in tasks if name not in zoo.tasks]
    if unknown:
        raise MergewiseError(
            f"--tasks: {', '.join(unknown)} not in {zoo.root / 'zoo.json'} (has {', '.join(zoo.tasks)})"
        )
    return list(tasks)


def score_task(
    loaded: LoadedModel, zoo: Zoo, name: str, batch_size: int, limit: int | None, split: str | None = None
) -> dict:
    examples = zoo.eval_examples(name, split)[:limit]
    if not examples:
        raise MergewiseError(f"{zoo.tasks[name].eval}: no examples")
    pairs = [(example["prompt"], example["answer"]) for example in examples]
    likelihoods = continuation_log_likelihoods(loaded, pairs, batch_size)
    answer_nll = -sum(total for total, _, _ in likelihoods) / sum(count for _, _, count in likelihoods)
    result = {"metric": zoo.tasks[name].metric, "score": round(answer_nll, 4), "n": len(examples)}
    if result["metric"] == "exact_match":
        longest = max(len(loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]) for _, answer in pairs)
        completions = greedy_completions(
            loaded, [prompt for prompt, _ in pairs], longest + EXTRA_GENERATED_TOKENS, batch_size
        )
        hits = sum(exact_match(completion, answer) for completion, (_, answer) in zip(completions, pairs))
        result["score"] = round(hits / len(pairs), 4)
    result["answer_nll"] = round(answer_nll, 4)
    return result


def format_table(results: dict) -> str:
    """A compact fixed-width table for the terminal."""
    rows = [("task", "metric", "score", "answer_nll", "n")]
    for name, entry in results["tasks"].items():
        rows.append((name, entry["metric"], f"{entry['score']:.4f}", f"{entry['answer_nll']:.4f}", str(entry["n"])))
    general = results["general"]
    rows.append(("general", general["metric"], f"{general['score']:.4f}", "", str(general["n"])))
    text = _columns(rows)
    if "routing" in results:
        text += "\n\n" + _routing_table(results["routing"], results.get("routing_estimate"))
    return text


def _routing_table(routing: dict, estimate: dict | None) -> str:
    """Per task, the share of its prompts selected to its own expert and the shares of each decision;
    then the same over the tasks with an expert, beside the build's own held-out estimate."""
    rows = [("routing", "own selected", "select", "blend", "dense")]
    for name, entry in routing.items():
        own = f"{entry['own_selected']:.3f}" if "own_selected" in entry else "-"
        rows.append((name, own, *(f"{entry[decision]:.3f}" for decision in ("select", "blend", "dense"))))
    experts = [entry for entry in routing.values() if "own_selected" in entry]
    if experts:
        own = sum(entry["own_selected"] for entry in experts) / len(experts)
        flagged = sum(entry["blend"] + entry["dense"] for entry in experts) / len(experts)
        rows.append(("tasks with an expert", f"{own:.3f}", "", f"flagged {flagged:.3f}", ""))
        if estimate is not None:
            rows.append(
                (
                    "  build's estimate",
                    f"{estimate['heldout_own_selected']:.3f}",
                    "",
                    f"flagged {estimate['heldout_flagged']:.3f}",
                    "",
                )
            )
    return _columns(rows)


def _columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
