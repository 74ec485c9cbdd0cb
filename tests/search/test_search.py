"""`mergewise search`: search spaces and their errors, a 4-trial search on a local Ray, and `--resume`."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergewise import merge
from mergewise.cli import main
from mergewise.errors import MergewiseError
from mergewise.search.objective import score_model
from mergewise.search.space import load_search_recipe
from tests.support.crafted import billion_laughs
from tests.support.processes import run_measured
from tests.test_errors import assert_refused

ray = pytest.importorskip("ray")
pytest.importorskip("optuna")


def search_recipe(zoo: Path, **changes) -> dict:
    """The issue's example shape, sized for the tiny zoo."""
    recipe = {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [
            {
                "model": str(zoo / "expert-first"),
                "parameters": {
                    "weight": {"search": "uniform", "low": 0.2, "high": 1.0},
                    "density": {"search": "choice", "values": [0.3, 0.5, 0.7]},
                },
            },
            {
                "model": str(zoo / "expert-last"),
                "parameters": {"weight": {"search": "uniform", "low": 0.2, "high": 1.0}, "density": 0.5},
            },
        ],
        "aim": {
            "omega": {"search": "uniform", "low": 0.2, "high": 1.0},
            "calibration": {"data": "self", "samples": 4, "seq_len": 32},
        },
        "dtype": "bfloat16",
        "search": {
            "trials": 4,
            "searcher": "optuna",
            "objective": {"zoo": str(zoo), "tasks": {"first": 1.0, "last": 1.0}, "limit": 4, "metric": "answer_nll"},
            "keep": 2,
            "resources": {"cpus": 1},
        },
    }
    recipe.update(changes)
    return recipe


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_trials(out_dir: Path) -> list[dict]:
    with (out_dir / "trials.csv").open() as file:
        return list(csv.DictReader(file))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    merged = {}
    for shard in sorted(folder.glob("*.safetensors")):
        merged.update(load_file(shard))
    return merged


# ----------------------------------------------------------------------------- spaces, no Ray


def test_spaces_are_named_by_path_and_substituted(fake_zoo, tmp_path):
    recipe = search_recipe(fake_zoo)
    recipe["parameters"] = {"lambda": {"search": "loguniform", "low": 0.5, "high": 2.0}}
    recipe["models"][1]["parameters"]["density"] = [{"search": "int", "low": 0, "high": 1}, 0.5]
    search = load_search_recipe(write(tmp_path / "s.yml", recipe))
    assert [space.name for space in search.spaces] == [
        "models.0.parameters.weight",
        "models.0.parameters.density",
        "models.1.parameters.weight",
        "models.1.parameters.density.0",
        "aim.omega",
        "parameters.lambda",
    ]
    baseline = search.baseline()
    # the key's own default where it has one (AIM's ω 0.4, ties' λ 1.0), else the space's centre
    assert baseline == {
        "models.0.parameters.weight": 0.6,
        "models.0.parameters.density": 0.5,
        "models.1.parameters.weight": 0.6,
        "models.1.parameters.density.0": 1.0,
        "aim.omega": 0.4,
        "parameters.lambda": 1.0,
    }
    concrete = search.concrete({**baseline, "models.1.parameters.density.0": 0})
    assert concrete["models"][1]["parameters"]["density"] == [0, 0.5]
    assert isinstance(concrete["models"][1]["parameters"]["density"][0], int)
    assert concrete["aim"]["omega"] == 0.4 and "search" not in concrete
    assert search.template["models"][0]["parameters"]["weight"] is None  # the template keeps no space


def test_centre_of_a_space_without_a_default(fake_zoo, tmp_path):
    recipe = search_recipe(fake_zoo)
    recipe["aim"]["exponent"] = {"search": "loguniform", "low": 2.0, "high": 8.0}  # exponent's default 1 lies outside
    recipe["aim"]["omega"]["default"] = 0.9
    search = load_search_recipe(write(tmp_path / "s.yml", recipe))
    assert search.baseline()["aim.exponent"] == pytest.approx(4.0)
    assert search.baseline()["aim.omega"] == 0.9


BAD_SPACES = {
    "low above high": (
        ("models", 0, "parameters", "weight"),
        {"search": "uniform", "low": 1.0, "high": 0.2},
        ["models.0.parameters.weight", "low (1.0) > high (0.2)"],
    ),
    "non-numeric key": (("dtype",), {"search": "choice", "values": [1, 2]}, ["dtype", "not a numeric setting"]),
    "boolean parameter": (
        ("parameters",),
        {"normalize": {"search": "choice", "values": [0, 1]}},
        ["parameters.normalize", "not numeric"],
    ),
    "string setting": (
        ("aim", "modules"),
        {"search": "uniform", "low": 0, "high": 1},
        ["aim.modules", "not a numeric setting"],
    ),
    "calibration is fixed": (
        ("aim", "calibration", "samples"),
        {"search": "int", "low": 2, "high": 8},
        ["aim.calibration.samples", "not a numeric setting"],
    ),
    "unknown parameter": (
        ("models", 1, "parameters", "gamma"),
        {"search": "uniform", "low": 0, "high": 1},
        ["models.1.parameters.gamma", "not a parameter of ties"],
    ),
    "unknown kind": (("aim", "omega"), {"search": "normal", "low": 0, "high": 1}, ["aim.omega", "'normal'"]),
    "choice of words": (
        ("aim", "omega"),
        {"search": "choice", "values": ["low", "high"]},
        ["aim.omega.values", "expected a finite number"],
    ),
    "default outside": (
        ("aim", "omega"),
        {"search": "uniform", "low": 0.2, "high": 0.5, "default": 0.9},
        ["aim.omega.default", "outside"],
    ),
    "loguniform at zero": (
        ("aim", "omega"),
        {"search": "loguniform", "low": 0, "high": 1},
        ["aim.omega.low", "above 0"],
    ),
    "bound the recipe refuses": (
        ("models", 1, "parameters", "density"),
        {"search": "uniform", "low": 0.5, "high": 1.5},
        ["density", "[0, 1]"],
    ),
    "choice the recipe refuses": (
        ("models", 1, "parameters", "density"),
        {"search": "choice", "values": [0.5, 1.5, 0.3]},
        ["density", "[0, 1]"],
    ),
    "objective task not in the zoo": (
        ("search", "objective", "tasks"),
        {"first": 1.0, "sum": 1.0},
        ["search.objective.tasks", "sum"],
    ),
    "grid over a uniform space": (("search", "searcher"), "grid", ["grid needs choice or int", "weight"]),
}


@pytest.mark.parametrize("case", BAD_SPACES, ids=list(BAD_SPACES))
def test_bad_search_recipe_is_one_error_naming_the_key(case, fake_zoo, tmp_path, capsys):
    path, value, named = BAD_SPACES[case]
    recipe = search_recipe(fake_zoo)
    node = recipe
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    status = main(["search", str(write(tmp_path / "s.yml", recipe)), str(tmp_path / "out"), "--quiet"])
    assert_refused(capsys, status, tmp_path / "out", *named)


@pytest.mark.integration
def test_a_grid_of_a_billion_points_is_refused_before_it_is_listed(fake_zoo, tmp_path):
    """An int space of a billion values under `searcher: grid` was listed whole: a MemoryError."""
    recipe = search_recipe(fake_zoo)
    recipe["models"][0]["parameters"] = {"weight": {"search": "int", "low": 0, "high": 1_000_000_000}, "density": 0.5}
    recipe["models"][1]["parameters"]["weight"] = 0.5
    recipe["aim"]["omega"] = 0.4
    recipe["search"]["searcher"] = "grid"
    run_measured("search", str(write(tmp_path / "s.yml", recipe)), str(tmp_path / "out"), "--quiet").assert_one_error(
        "search.searcher: grid runs every combination of the spaces, here 1000000001 trials; at most 10000"
    )
    assert not (tmp_path / "out").exists()


def test_aim_without_a_base_model_is_refused_before_calibrating(fake_zoo, tmp_path, capsys):
    """Calibrating once for every trial read the base of a recipe that had none: an AttributeError."""
    recipe = search_recipe(fake_zoo, merge_method="linear")
    del recipe["base_model"]
    for model in recipe["models"]:
        del model["parameters"]["density"]
    status = main(["search", str(write(tmp_path / "s.yml", recipe)), str(tmp_path / "out"), "--quiet"])
    assert_refused(capsys, status, tmp_path / "out", "s.yml", "aim needs base_model")


@pytest.mark.integration
def test_a_search_file_of_nested_aliases_is_refused_at_once(fake_zoo, tmp_path):
    """616 bytes of YAML anchors standing for 10**9 values ran for minutes."""
    text = yaml.safe_dump(search_recipe(fake_zoo), sort_keys=False) + billion_laughs(9, "bomb_")
    search_file = tmp_path / "s.yml"
    search_file.write_text(text)
    result = run_measured("search", str(search_file), str(tmp_path / "out"), "--quiet")
    result.assert_one_error(str(search_file), "more than 1000000 values once its aliases are expanded")
    assert result.seconds < 20 and not (tmp_path / "out").exists()


def test_a_folder_holding_something_else_is_refused_without_resume(fake_zoo, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    status = main(["search", str(write(tmp_path / "s.yml", search_recipe(fake_zoo))), str(tmp_path / "out")])
    assert_refused(
        capsys,
        status,
        tmp_path / "out",
        "not empty",
        "--resume",
        out_dir_before={"notes.txt": __import__("hashlib").sha256(b"mine").hexdigest()},
    )


def test_resume_keeps_the_trial_count_it_started_with(fake_zoo, tmp_path, capsys):
    search_file = write(tmp_path / "s.yml", search_recipe(fake_zoo))
    status = main(["search", str(search_file), str(tmp_path / "out"), "--resume", "--trials", "9"])
    assert_refused(capsys, status, tmp_path / "out", "--trials", "resumed")


def test_zoo_held_out_prompts_split_into_disjoint_halves(fake_zoo):
    from mergewise.zoo import load_zoo

    zoo = load_zoo(fake_zoo)
    everything = zoo.eval_examples("first")
    validation, test = zoo.eval_examples("first", "validation"), zoo.eval_examples("first", "test")
    assert validation + test == everything and len(validation) == math.ceil(len(everything) / 2)
    with pytest.raises(ValueError, match="split"):
        zoo.eval_examples("first", "train")


# ----------------------------------------------------------------------------- on a local Ray


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs (what CI has), started once for the module's searches: a search attaches
    to it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.integration
def test_four_trial_search_writes_a_runnable_best_recipe(tiny_zoo, tmp_path, local_ray):
    from mergewise.search import run_search

    out_dir = tmp_path / "out"
    result = run_search(write(tmp_path / "search.yml", search_recipe(tiny_zoo)), out_dir, quiet=True)
    assert ray.is_initialized()  # a Ray it did not start is left running
    rows = read_trials(out_dir)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"TERMINATED"}
    for row in rows:
        assert 0.2 <= float(row["models.0.parameters.weight"]) <= 1.0
        assert float(row["models.0.parameters.density"]) in (0.3, 0.5, 0.7)
        assert float(row["score"]) == pytest.approx((float(row["task:first"]) + float(row["task:last"])) / 2, abs=1e-6)
    scores = [float(row["score"]) for row in rows]
    best = max(rows, key=lambda row: float(row["score"]))
    assert result.best["trial"] == best["trial"] and result.best["validation"] == max(scores)
    # only the `keep` best models stay, the best among them
    assert sorted(path.name for path in (out_dir / "models").iterdir()) == sorted(
        row["trial"] for row in sorted(rows, key=lambda row: -float(row["score"]))[:2]
    )
    # the baseline is the first trial (seeded), so the best never scores below it on validation
    baseline_values = {
        "models.0.parameters.weight": 0.6,
        "models.0.parameters.density": 0.5,
        "models.1.parameters.weight": 0.6,
        "aim.omega": 0.4,
    }
    assert result.baseline["values"] == baseline_values
    seeded = [row for row in rows if all(float(row[key]) == value for key, value in baseline_values.items())]
    assert [float(row["score"]) for row in seeded] == [result.baseline["validation"]]
    # best.yml is concrete and runnable from anywhere: merging it again gives best-model's tensors
    best_recipe = yaml.safe_load((out_dir / "best.yml").read_text())
    assert "search" not in best_recipe and best_recipe["aim"]["calibration"]["samples"] == 4
    again = merge(out_dir / "best.yml", tmp_path / "again", quiet=True, threads=1)
    expected, found = tensors(out_dir / "best-model"), tensors(Path(again))
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[name], found[name]) for name in expected)
    # scores: validation as recorded, test on the other half
    objective = load_search_recipe(out_dir.parent / "search.yml").settings.objective
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["best"]["test"] == score_model(out_dir / "best-model", objective, "test")
    assert summary["best"]["validation"] == score_model(out_dir / "best-model", objective, "validation")["score"]
    assert (out_dir / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out_dir / "models" / "baseline").exists()


@pytest.mark.integration
def test_resume_after_an_interrupted_search_does_not_redo_finished_trials(tiny_zoo, tmp_path, local_ray):
    recipe = search_recipe(tiny_zoo)
    recipe["search"].update(trials=4, resources={"cpus": 2})  # one trial at a time
    search_file, out_dir = write(tmp_path / "search.yml", recipe), tmp_path / "out"
    command = [sys.executable, "-m", "mergewise.cli", "search", str(search_file), str(out_dir), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = out_dir / "trials"
    deadline = time.monotonic() + 240
    while not (records.is_dir() and any(records.glob("*.json"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # as Ctrl-C does
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "--resume" in err, err
    finished = {path.name: (path.stat().st_mtime_ns, path.read_text()) for path in records.glob("*.json")}
    assert 1 <= len(finished) < 4

    assert main(["search", str(search_file), str(out_dir), "--resume", "--quiet"]) == 0  # on the local Ray
    rows = read_trials(out_dir)
    assert len(rows) == 4 and {row["status"] for row in rows} == {"TERMINATED"}
    for name, (mtime, text) in finished.items():  # reported from its record, not merged and scored again
        assert (records / name).stat().st_mtime_ns == mtime and (records / name).read_text() == text
    assert len(list(records.glob("*.json"))) == 4
    assert (out_dir / "best-model").is_dir() and len(list((out_dir / "models").iterdir())) == 2


def test_run_search_names_the_missing_extra(monkeypatch, tmp_path):
    import mergewise.search as search

    monkeypatch.setitem(sys.modules, "ray.tune", None)
    with pytest.raises(MergewiseError, match=r"mergewise\[search\]"):
        search.run_search(tmp_path / "s.yml", tmp_path / "out")
    assert os.path.exists(tmp_path) and not (tmp_path / "out").exists()


@pytest.mark.integration
def test_lm_eval_objective_takes_each_task_first_metric_higher_is_better(tiny_zoo, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from mergewise.evaluate import load_model
    from mergewise.evaluate.scoring import greedy_completions
    from mergewise.search.objective import resolve_objective
    from mergewise.search.space import Objective
    from tests.evaluate.test_lm_eval_adapter import write_tasks

    model_dir = tiny_zoo / "expert-max"
    prompts = [json.loads(line)["prompt"] for line in (tiny_zoo / "tasks/max/eval.jsonl").read_text().splitlines()][:4]
    answers = greedy_completions(load_model(model_dir), prompts, max_new_tokens=4, batch_size=4)  # exact match 1
    data_file = tmp_path / "tasks" / "max.jsonl"
    data_file.parent.mkdir()
    data_file.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    write_tasks(data_file.parent, data_file)
    objective = resolve_objective(
        Objective(
            lm_eval={
                "tasks": ["mw_generate", "mw_rolling"],
                "include_path": "tasks",
                "test_tasks": ["mw_generate"],
                "batch_size": 4,
            }
        ),
        tmp_path,
        "s.yml",
    )
    validation = score_model(model_dir, objective, "validation")
    perplexity = lm_eval.simple_evaluate(
        model="mergewise",
        model_args=f"pretrained={model_dir},device=cpu",
        tasks=["mw_rolling"],
        batch_size=4,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )["results"]["mw_rolling"]["word_perplexity,none"]
    assert validation["tasks"] == {"mw_generate": 1.0, "mw_rolling": pytest.approx(-perplexity)}  # lower is better
    assert validation["score"] == pytest.approx((1.0 - perplexity) / 2, abs=1e-6)
    assert score_model(model_dir, objective, "test") == {"score": 1.0, "tasks": {"mw_generate": 1.0}}
    assert (
        score_model(
            model_dir,
            objective.model_copy(update={"lm_eval": objective.lm_eval.model_copy(update={"test_tasks": None})}),
            "test",
        )
        is None
    )


def test_lm_eval_indexes_its_bundled_tasks_only_when_the_folder_lacks_one(tmp_path, monkeypatch):
    """Indexing lm-eval's bundled tasks takes ~10 s per scoring; a folder holding every task skips it."""
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    from mergewise.search.objective import _task_manager
    from tests.evaluate.test_lm_eval_adapter import write_tasks

    local_names = write_tasks(tmp_path, tmp_path / "data.jsonl")
    local = _task_manager(str(tmp_path), local_names)
    assert set(local_names) <= set(local.all_tasks) and "arc_easy" not in local.all_tasks

    built = []

    class Recorded(lm_eval_tasks.TaskManager):  # the bundled index itself is not what is tested
        def __init__(self, include_path=None, include_defaults=True):
            built.append(include_defaults)
            super().__init__(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(lm_eval_tasks, "TaskManager", Recorded)
    _task_manager(str(tmp_path), [*local_names, "arc_easy"])
    _task_manager(None, ["arc_easy"])
    assert built == [False, True, True]


@pytest.mark.integration
def test_grid_runs_every_combination_once_and_cmaes_runs(tiny_zoo, tmp_path, local_ray):
    from mergewise.search import run_search

    grid = search_recipe(tiny_zoo)
    grid["models"][0]["parameters"]["weight"] = {"search": "choice", "values": [0.5, 1.0]}
    grid["models"][0]["parameters"]["density"]["values"] = [0.3, 0.7]
    grid["models"][1]["parameters"]["weight"] = {"search": "int", "low": 0, "high": 1}
    grid["aim"]["omega"] = 0.4
    grid["search"].update(searcher="grid", trials=1)
    run_search(write(tmp_path / "grid.yml", grid), tmp_path / "grid", quiet=True)
    combinations = {
        (
            float(row["models.0.parameters.weight"]),
            float(row["models.0.parameters.density"]),
            float(row["models.1.parameters.weight"]),
        )
        for row in read_trials(tmp_path / "grid")
    }
    assert len(read_trials(tmp_path / "grid")) == len(combinations) == 2 * 2 * 2
    cmaes = search_recipe(tiny_zoo)
    cmaes["search"].update(searcher="cmaes", trials=3)
    result = run_search(write(tmp_path / "cmaes.yml", cmaes), tmp_path / "cmaes", quiet=True)
    assert len(result.trials) == 3 and result.best["validation"] >= result.baseline["validation"]
