"""The search driver: Ray Tune runs the trials (Optuna's samplers choose their values), a callback keeps
only the best models on disk and trials.csv current, and the end writes best.yml, the best model, a
plot and the held-out test scores of the best and the baseline recipe.

OUT_DIR holds:
    trials.csv          every trial: its values, validation scores, seconds, status
    best.yml            the best trial's recipe, runnable as it is (paths relative to OUT_DIR)
    best-model/         the best trial's model (hard links to its files where the filesystem allows)
    search.png          score per trial and per searched value
    summary.json        best and baseline recipe on validation and test prompts, wall time
    models/<trial>/     the `keep` best trials' models; the others are deleted as the search goes
    trials/<trial>.json each finished trial's result (a resumed search reports it, not redoes it)
    aim-stats.safetensors  the base's AIM statistics, calibrated once for every trial
    ray/                Ray Tune's experiment state (what `--resume` continues from)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from mergewise.config import Recipe, load_recipe
from mergewise.errors import MergewiseError
from mergewise.plan import MergePlan, build_plan
from mergewise.search.objective import resolve_objective, score_model
from mergewise.search.space import SearchRecipe, load_search_recipe
from mergewise.search.trial import TrialSetup, run_trial

EXPERIMENT = "search"
PATH_KEYS = ("model", "base_model", "stats", "data", "prompts")


@dataclasses.dataclass(frozen=True)
class SearchResult:
    out_dir: Path
    best: dict  # trial id, values, validation and test scores
    baseline: dict  # the same for the baseline recipe
    trials: list[dict]  # the rows of trials.csv
    seconds: float


def run_search(
    search_file: str | Path,
    out_dir: str | Path,
    *,
    trials: int | None = None,
    address: str | None = None,
    resume: bool = False,
    device: str | None = None,
    quiet: bool = False,
) -> SearchResult:
    """Search the spaces of SEARCH.yml on Ray Tune (local Ray unless `address` names a cluster) and
    write OUT_DIR (see the module docstring). Trials merge and score on `device`, by default the GPU
    when `search.resources` gives each trial one."""
    started = time.time()
    search = load_search_recipe(search_file)
    device = device or ("cuda" if search.settings.resources.gpus > 0 else "cpu")
    if trials is not None and resume:
        raise MergewiseError("--trials: a resumed search keeps the trial count it started with; leave it out")
    if trials is not None:
        search = dataclasses.replace(search, settings=search.settings.model_copy(update={"trials": trials}))
    objective = resolve_objective(search.settings.objective, search.config_dir, search.origin)
    out_dir = Path(out_dir).expanduser().resolve()
    experiment = out_dir / "ray" / EXPERIMENT
    if out_dir.exists() and any(out_dir.iterdir()) and not resume:
        raise MergewiseError(f"{out_dir}: not empty (--resume continues the search it holds; or choose a new folder)")
    baseline_plan = _check_corners(search)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup = TrialSetup(
        _calibrated_once(search, baseline_plan, out_dir, device, quiet),
        objective,
        out_dir / "models",
        out_dir / "trials",
        max(1, math.floor(search.settings.resources.cpus)),
        device,
    )
    rows = _run_trials(setup, search, experiment, out_dir, address, resume, quiet)
    if len(rows) < _expected_trials(search):
        raise MergewiseError(
            f"search interrupted after {len(rows)} of {_expected_trials(search)} trials; "
            f"`mergewise search {search.origin} {out_dir} --resume` continues it"
        )
    finished = [row for row in rows if row["status"] == "TERMINATED" and row.get("score") is not None]
    if not finished:
        raise MergewiseError(f"{out_dir / 'trials.csv'}: no trial finished (see its error column)")
    best = max(finished, key=lambda row: row["score"])
    best_model = _publish_best_model(out_dir, setup.models_dir / best["trial"])
    _write_best_recipe(search, best, out_dir)
    baseline = _score_baseline(setup, out_dir, rows)
    best_summary = {
        "trial": best["trial"],
        "values": {space.name: best[space.name] for space in search.spaces},
        "validation": best["score"],
        "test": score_model(best_model, objective, "test", device),
    }
    seconds = round(time.time() - started, 1)
    summary = {
        "best": best_summary,
        "baseline": baseline,
        "trials": len(rows),
        "finished": len(finished),
        "seconds": seconds,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _plot(search, rows, out_dir / "search.png")
    return SearchResult(out_dir, best_summary, baseline, rows, seconds)


def _expected_trials(search: SearchRecipe) -> int:
    if search.settings.searcher == "grid":
        return math.prod(space.grid_size() for space in search.spaces)
    return search.settings.trials


def _check_corners(search: SearchRecipe) -> tuple[Recipe, MergePlan]:
    """Plan the baseline and the recipes at every space's low and high end: a bound the recipe
    refuses (a density of 1.5) fails now, naming the key, not in trial 17; so does an aim block
    without a base model. Returns the baseline's."""
    corners: list[dict[str, Any]] = [
        search.baseline(),
        {space.name: space.low for space in search.spaces},
        {space.name: space.high for space in search.spaces},
    ]
    planned = []
    for values in corners:
        recipe = load_recipe(search.concrete(values), config_dir=search.config_dir, origin=search.origin)
        plan = build_plan(recipe.config, recipe.config_dir, base_model=recipe.base_model, download=False)
        planned.append((recipe, plan))
    baseline = planned[0][0]
    if "aim" in baseline.blocks and baseline.base_model is None:
        raise MergewiseError(f"{search.origin}: aim needs base_model (the model the relaxation pulls toward)")
    planned[0][1].fetch_weights()
    return planned[0]


def _calibrated_once(
    search: SearchRecipe, baseline: tuple[Recipe, MergePlan], out_dir: Path, device: str, quiet: bool
) -> SearchRecipe:
    """AIM's statistics depend on the base and the calibration settings alone, which no trial
    changes: calibrate once and let every trial read the file."""
    aim = search.template.get("aim")
    if not isinstance(aim, dict) or "calibration" not in aim:
        return search
    from mergewise.aim.stage import AimBlock
    from mergewise.aim.statistics import CalibrationSettings, calibrate

    recipe, plan = baseline
    block = recipe.blocks["aim"]
    assert isinstance(block, AimBlock) and block.calibration is not None  # the template's aim block calibrates
    assert plan.base_model is not None  # _check_corners refused an aim block without one
    calibration = block.calibration
    stats_path = out_dir / "aim-stats.safetensors"
    if not stats_path.is_file():
        settings = CalibrationSettings(**calibration.model_dump(exclude={"stream_layers"}))
        calibrate(
            plan.base_model.path,
            stats_path,
            settings,
            device=device,
            stream_layers=calibration.stream_layers,
            quiet=quiet,
        )
    template = {
        **search.template,
        "aim": {**{key: value for key, value in aim.items() if key != "calibration"}, "stats": str(stats_path)},
    }
    return dataclasses.replace(search, template=template)


def _run_trials(
    setup: TrialSetup,
    search: SearchRecipe,
    experiment: Path,
    out_dir: Path,
    address: str | None,
    resume: bool,
    quiet: bool,
) -> list[dict]:
    import ray
    from ray import tune

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=not quiet,
            logging_level=logging.WARNING,
        )
    try:
        resources = {"cpu": search.settings.resources.cpus, "gpu": search.settings.resources.gpus}
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)
        if resume and tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
        else:
            concurrent = _concurrent_trials(ray.cluster_resources(), resources)
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(search),
                tune_config=_tune_config(search, concurrent),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(experiment.parent),
                    callbacks=[KeepBest(search, setup.models_dir, out_dir / "trials.csv")],
                    verbose=0 if quiet else 1,
                ),
            )
        results = tuner.fit()
    finally:
        if started_ray:
            ray.shutdown()
    rows = [
        _row(
            search,
            Path(result.path).name,
            result.config,
            result.metrics,
            "ERROR" if result.error else "TERMINATED",
            result.error,
        )
        for result in results  # type: ignore[attr-defined]  # a ResultGrid iterates through __getitem__
    ]
    keep_best(rows, setup.models_dir, search.settings.keep)
    _write_trials_csv(rows, out_dir / "trials.csv")
    return rows


def _param_space(search: SearchRecipe) -> dict:
    from ray import tune

    if search.settings.searcher == "grid":
        return {space.name: tune.grid_search(space.grid()) for space in search.spaces}
    make = {
        "uniform": lambda s: tune.uniform(s.low, s.high),
        "loguniform": lambda s: tune.loguniform(s.low, s.high),
        "int": lambda s: tune.randint(int(s.low), int(s.high) + 1),
        "choice": lambda s: tune.choice(list(s.values)),
    }
    return {space.name: make[space.kind](space) for space in search.spaces}


def _concurrent_trials(available: dict, per_trial: dict) -> int:
    """As many trials at once as the cluster's CPUs (and GPUs) hold."""
    fits = [available.get(kind.upper(), 0) // amount for kind, amount in per_trial.items() if amount > 0]
    if min(fits) < 1:
        raise MergewiseError(
            f"search.resources: a trial asks for {per_trial}; the Ray cluster has "
            f"{available.get('CPU', 0)} CPUs and {available.get('GPU', 0)} GPUs"
        )
    return int(min(fits))


def _tune_config(search: SearchRecipe, concurrent: int):
    """Workers are reused from trial to trial, so each imports torch and transformers once."""
    from ray import tune

    settings = search.settings
    common: dict[str, Any] = {
        "metric": "score",
        "mode": "max",
        "max_concurrent_trials": concurrent,
        "reuse_actors": True,
        "trial_dirname_creator": _trial_dirname,
    }
    if settings.searcher == "grid":
        return tune.TuneConfig(num_samples=1, **common)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    samplers = {
        "optuna": optuna.samplers.TPESampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "random": optuna.samplers.RandomSampler,
    }
    searcher = OptunaSearch(
        sampler=samplers[settings.searcher](seed=settings.seed), points_to_evaluate=[search.baseline()]
    )
    return tune.TuneConfig(num_samples=settings.trials, search_alg=searcher, **common)


def _trial_dirname(trial) -> str:
    """Ray's folder of a trial is named by its id alone, as its model folder is."""
    return trial.trial_id


def _row(search: SearchRecipe, trial: str, config: dict, metrics: dict, status: str, error) -> dict:
    if status == "TERMINATED" and "score" not in metrics:
        status = "INTERRUPTED"  # stopped before it reported; `--resume` runs it
    row: dict[str, Any] = {"trial": trial, "status": status}
    row.update({space.name: config.get(space.name) for space in search.spaces})
    row["score"] = metrics.get("score")
    row.update({key: value for key, value in metrics.items() if key.startswith("task:")})
    row.update({key: metrics.get(key) for key in ("merge_s", "eval_s", "finished")})
    row["error"] = str(error).strip().splitlines()[-1] if error else ""
    return row


def _write_trials_csv(rows: list[dict], path: Path) -> None:
    rows = sorted(rows, key=lambda row: (row["finished"] is None, row["finished"] or ""))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    temporary = path.with_suffix(".csv.tmp")
    with temporary.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def _ranked(rows: list[dict]) -> list[dict]:
    return sorted(
        (row for row in rows if row["status"] == "TERMINATED" and row["score"] is not None),
        key=lambda row: row["score"],
        reverse=True,
    )


try:  # the callback class needs Ray; importing this module must not
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - the search extra is not installed
    _TuneCallback = object  # type: ignore[misc,assignment]  # a stand-in base class


class KeepBest(_TuneCallback):
    """After each finished trial: delete the models of all but the `keep` best, rewrite trials.csv."""

    def __init__(self, search: SearchRecipe, models_dir: Path, csv_path: Path):
        self.search, self.models_dir, self.csv_path = search, models_dir, csv_path

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._refresh(trials, trial.trial_id, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        shutil.rmtree(self.models_dir / trial.trial_id, ignore_errors=True)
        self._refresh(trials, trial.trial_id, "ERROR")

    def _refresh(self, trials, ended: str, status: str) -> None:
        """`ended`'s status is not yet updated when the callback runs."""
        rows = [
            _row(
                self.search,
                trial.trial_id,
                trial.config,
                trial.last_result or {},
                status if trial.trial_id == ended else trial.status,
                trial.error_file and "see " + trial.error_file,
            )
            for trial in trials
        ]
        keep_best(rows, self.models_dir, self.search.settings.keep)
        _write_trials_csv(rows, self.csv_path)


def keep_best(rows: list[dict], models_dir: Path, keep: int) -> None:
    """Delete the models of every finished trial but the `keep` best."""
    for row in _ranked(rows)[keep:]:
        shutil.rmtree(models_dir / row["trial"], ignore_errors=True)


def _publish_best_model(out_dir: Path, trial_model: Path) -> Path:
    """OUT_DIR/best-model: the best trial's files, hard-linked (copied across filesystems)."""
    if not trial_model.is_dir():
        raise MergewiseError(f"{trial_model}: the best trial's model is missing (was it deleted by hand?)")
    staging = out_dir / ".best-model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(trial_model, staging, copy_function=_link_or_copy)
    shutil.rmtree(out_dir / "best-model", ignore_errors=True)
    os.replace(staging, out_dir / "best-model")
    return out_dir / "best-model"


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_best_recipe(search: SearchRecipe, best: dict, out_dir: Path) -> None:
    recipe = _paths_from(search.concrete(best), search.config_dir, out_dir)
    header = (
        f"# mergewise search: trial {best['trial']} of {search.origin}, validation score {best['score']}\n"
        f"# mergewise merge {out_dir / 'best.yml'} OUT_DIR\n"
    )
    (out_dir / "best.yml").write_text(header + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def _paths_from(node, config_dir: Path, out_dir: Path):
    """The recipe with each relative path (of a `model`, `base_model`, `stats`, `data` or `prompts`
    key) rewritten relative to OUT_DIR, where best.yml lies."""
    if isinstance(node, list):
        return [_paths_from(value, config_dir, out_dir) for value in node]
    if not isinstance(node, dict):
        return node
    rewritten = {}
    for key, value in node.items():
        if key in PATH_KEYS and isinstance(value, str):
            value = "+".join(_relocated(part, config_dir, out_dir) for part in value.split("+"))
        rewritten[key] = _paths_from(value, config_dir, out_dir)
    return rewritten


def _relocated(path: str, config_dir: Path, out_dir: Path) -> str:
    if Path(path).is_absolute() or not (config_dir / path).exists():
        return path
    return os.path.relpath(config_dir / path, out_dir)


def _score_baseline(setup: TrialSetup, out_dir: Path, rows: list[dict]) -> dict:
    """The baseline recipe on both halves: its seeded trial's model where it is still on disk, else
    merged once more (and deleted after)."""
    values = setup.search.baseline()
    seeded = next(
        (
            row
            for row in _ranked(rows)
            if all(row[name] == value for name, value in values.items()) and (setup.models_dir / row["trial"]).is_dir()
        ),
        None,
    )
    if seeded is not None:
        folder = setup.models_dir / seeded["trial"]
        return {
            "values": values,
            "validation": seeded["score"],
            "test": score_model(folder, setup.objective, "test", setup.device),
        }
    folder = setup.models_dir / "baseline"
    setup.merge(values, folder)
    try:
        validation = score_model(folder, setup.objective, "validation", setup.device)["score"]
        return {
            "values": values,
            "validation": validation,
            "test": score_model(folder, setup.objective, "test", setup.device),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _plot(search: SearchRecipe, rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: the process's backend stays as it is

    scored = [row for row in sorted(rows, key=lambda row: row["finished"] or "") if row["score"] is not None]
    panels = 1 + len(search.spaces)
    columns = min(panels, 3)
    figure = Figure(figsize=(4.2 * columns, 3.4 * math.ceil(panels / columns)))
    axes = figure.subplots(math.ceil(panels / columns), columns, squeeze=False).ravel()
    scores = [row["score"] for row in scored]
    axes[0].plot(range(1, len(scores) + 1), scores, "o", label="trial")
    axes[0].plot(
        range(1, len(scores) + 1), [max(scores[: i + 1]) for i in range(len(scores))], "-", label="best so far"
    )
    axes[0].set(xlabel="trial (in finishing order)", ylabel="validation score", title="score per trial")
    axes[0].legend()
    for axis, space in zip(axes[1:], search.spaces):
        axis.plot([row[space.name] for row in scored], scores, "o")
        axis.set(xlabel=space.name, ylabel="validation score", xscale="log" if space.kind == "loguniform" else "linear")
    for axis in axes[panels:]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
