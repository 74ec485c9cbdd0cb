"""What a search maximises: a model folder's score on a zoo's validation prompts or on lm-eval tasks.

The zoo's held-out prompts are halved (`Zoo.eval_examples`): trials are scored on the validation half
only; the test half scores the best and the baseline recipe once, after the search.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

from mergewise.errors import MergewiseError
from mergewise.search.space import LmEvalObjective, Objective

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


def resolve_objective(objective: Objective, config_dir: Path, origin: str) -> Objective:
    """The objective with its zoo (or lm-eval task folder) read from the recipe's folder, checked."""
    if objective.zoo is not None:
        from mergewise.zoo.manifest import load_zoo

        zoo_dir = _inside(config_dir, objective.zoo)
        zoo = load_zoo(zoo_dir)
        weights = objective.tasks
        assert weights is not None  # Objective's validator: a zoo objective names its tasks
        missing = [name for name in weights if name not in zoo.tasks]
        if missing:
            raise MergewiseError(
                f"{origin}: search.objective.tasks: {', '.join(missing)} not in "
                f"{zoo.root / 'zoo.json'} (has {', '.join(zoo.tasks)})"
            )
        if any(weight < 0 for weight in weights.values()) or not sum(weights.values()) > 0:
            raise MergewiseError(f"{origin}: search.objective.tasks: weights are ≥ 0 and not all 0")
        return objective.model_copy(update={"zoo": str(zoo_dir)})
    lm_eval = objective.lm_eval
    assert lm_eval is not None  # Objective's validator: a zoo or lm_eval
    if lm_eval.include_path is not None:
        lm_eval = lm_eval.model_copy(update={"include_path": str(_inside(config_dir, lm_eval.include_path))})
    return objective.model_copy(update={"lm_eval": lm_eval})


def _inside(config_dir: Path, path: str) -> Path:
    written = Path(path).expanduser()
    return (written if written.is_absolute() else config_dir / written).resolve()


Split = Literal["validation", "test"]


@overload
def score_model(
    model_dir: str | Path, objective: Objective, split: Literal["validation"], device: str = "cpu"
) -> dict: ...
@overload
def score_model(model_dir: str | Path, objective: Objective, split: Split, device: str = "cpu") -> dict | None: ...
def score_model(model_dir: str | Path, objective: Objective, split: Split, device: str = "cpu") -> dict | None:
    """`{"score": the objective, "tasks": {task: score}}` on `split`; for lm-eval, `split` "test"
    scores the objective's `test_tasks` (None when it names none)."""
    if objective.zoo is not None:
        return _score_on_zoo(model_dir, objective.zoo, objective, split, device)
    assert objective.lm_eval is not None  # Objective's validator: a zoo or lm_eval
    return _score_with_lm_eval(model_dir, objective.lm_eval, split, device)


def _score_on_zoo(model_dir: str | Path, zoo_dir: str, objective: Objective, split: Split, device: str) -> dict:
    from mergewise.evaluate.loading import load_model
    from mergewise.evaluate.zoo_eval import score_task
    from mergewise.zoo.manifest import load_zoo

    weights = objective.tasks
    assert weights is not None  # Objective's validator: a zoo objective names its tasks
    zoo = load_zoo(zoo_dir)
    loaded = load_model(model_dir, device)
    limit = objective.limit if split == "validation" else None
    tasks = {}
    for name in weights:
        result = score_task(loaded, zoo, name, objective.batch_size, limit, split)
        own = result["metric"] == "exact_match" and objective.metric == "task"
        tasks[name] = result["score"] if own else -result["answer_nll"]
    total = sum(weights.values())
    score = sum(weight * tasks[name] for name, weight in weights.items()) / total
    return {"score": round(score, 6), "tasks": tasks}


def _score_with_lm_eval(
    model_dir: str | Path, lm_eval_objective: LmEvalObjective, split: Split, device: str
) -> dict | None:
    import lm_eval

    import mergewise.evaluate.lm_eval_adapter  # noqa: F401  (registers the "mergewise" model type)

    tasks = lm_eval_objective.tasks if split == "validation" else lm_eval_objective.test_tasks
    if not tasks:
        return None
    output = lm_eval.simple_evaluate(
        model="mergewise",
        model_args=f"pretrained={model_dir},device={device}",
        tasks=list(tasks),
        limit=lm_eval_objective.limit,
        batch_size=lm_eval_objective.batch_size,
        task_manager=_task_manager(lm_eval_objective.include_path, list(tasks)),
    )
    scores = {}
    for task in tasks:  # results hold "metric,filter" keys beside counts and stderrs
        metric, higher_is_better = next(iter(output["higher_is_better"][task].items()))
        value = next(value for key, value in output["results"][task].items() if key.split(",")[0] == metric)
        scores[task] = float(value) if higher_is_better else -float(value)
    return {"score": round(sum(scores.values()) / len(scores), 6), "tasks": scores}


def _task_manager(include_path: str | None, tasks: list[str]) -> TaskManager:
    """lm-eval's task index. Indexing the ~14 000 tasks it bundles takes about 10 s, paid on every
    trial's scoring, so when the `include_path` folder holds every task asked for, only it is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path)
