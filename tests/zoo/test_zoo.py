"""The zoo folder contract (zoo.md), resumability and seeding, on the test-sized `tiny` zoo."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergewise.cli import main
from mergewise.errors import MergewiseError
from mergewise.zoo import build_zoo, load_zoo
from mergewise.zoo import training as zoo_training
from tests.support.shared import run_wide_folder

pytestmark = pytest.mark.integration  # trains the tiny zoo

MODEL_NAMES = ["base", "expert-first", "expert-last", "expert-max", "expert-min"]


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    """The run's tiny zoo, through the CLI: the first build of the run, or a later one that finds it
    finished (the resume path)."""
    with run_wide_folder(tmp_path_factory, "tiny-zoo") as zoo_dir:
        assert main(["zoo", "build", str(zoo_dir), "--size", "tiny", "--seed", "0", "--threads", "1"]) == 0
    return zoo_dir


def test_zoo_json_follows_the_contract(tiny_zoo):
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    assert manifest["size"] == "tiny" and manifest["seed"] == 0 and manifest["base"] == "base"
    assert set(manifest["versions"]) == {"mergewise", "torch", "transformers", "python"}
    assert manifest["general"] == {**manifest["general"], "eval": "general/eval.txt", "metric": "nll"}
    held_back = [name for name, task in manifest["tasks"].items() if task["expert"] is None]
    assert held_back == ["count"]
    for name, task in manifest["tasks"].items():
        assert task["metric"] == "exact_match"
        assert task["calibration"] == f"tasks/{name}/calib.txt" and task["eval"] == f"tasks/{name}/eval.jsonl"
        assert task["data"]["eval"] == len((tiny_zoo / task["eval"]).read_text().splitlines())
    for name in MODEL_NAMES[1:]:
        record = manifest["models"][name]
        assert 0 < record["task_vector_norm_ratio"] < 1
        assert record["final_loss"] > 0 and len(record["loss_curve"]) >= 2
    assert manifest["models"]["base"]["parameters"] > 0


def test_zoo_json_records_every_models_scores_and_the_targets(tiny_zoo):
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    zoo = load_zoo(tiny_zoo)
    experts = [task.expert.name for task in zoo.tasks.values() if task.expert]
    assert set(manifest["scores"]) == {"base", *experts}
    for scores in manifest["scores"].values():
        assert set(scores) == set(zoo.tasks)
        assert all(0.0 <= score <= 1.0 for score in scores.values())
    targets = manifest["targets"]
    own = all(
        manifest["scores"][f"expert-{name}"][name] >= targets["expert_on_own_task_min"]
        for name, task in zoo.tasks.items()
        if task.expert
    )
    floor = all(score <= targets["base_max"] for score in manifest["scores"]["base"].values())
    assert targets["met"] == (own and floor)


def test_calibration_prompts_are_disjoint_from_eval_prompts(tiny_zoo):
    zoo = load_zoo(tiny_zoo)
    for name, task in zoo.tasks.items():
        eval_prompts = {example["prompt"] for example in zoo.eval_examples(name)}
        calibration = task.calibration.read_text().splitlines()
        assert calibration and eval_prompts and not eval_prompts & set(calibration)
        assert all(prompt.startswith(f"{name}: ") and prompt.endswith(" ->") for prompt in calibration)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_is_a_plain_hugging_face_folder(tiny_zoo, name):
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo / name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / name)
    encoded = tokenizer("max: 3 8 2 ->", return_tensors="pt")
    assert encoded["input_ids"][0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(encoded["input_ids"][0], skip_special_tokens=True) == "max: 3 8 2 ->"
    assert model(**encoded).logits.shape[-1] == len(tokenizer)
    assert not any(path.name.startswith(".building-") for path in tiny_zoo.iterdir())


def test_example_configs_point_at_zoo_models(tiny_zoo):
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    assert {"configs/linear.yml", "configs/ties.yml"} <= set(manifest["configs"])
    for relative in manifest["configs"]:
        path = tiny_zoo / relative
        config = yaml.safe_load(path.read_text())
        models = [entry["model"] for entry in config["models"]] + [config.get("base_model", "../base")]
        assert all((path.parent / model / "config.json").is_file() for model in models)
        assert {entry["model"] for entry in config["models"]} == {f"../{name}" for name in MODEL_NAMES[1:]}


def test_finished_models_are_not_retrained(tiny_zoo, tmp_path, monkeypatch):
    zoo_dir = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo_dir)
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    del manifest["models"]["expert-max"]  # as if the build had stopped before finishing it
    (zoo_dir / "zoo.json").write_text(json.dumps(manifest))
    base_weights = (zoo_dir / "base" / "model.safetensors").read_bytes()

    trained = []
    real_run_training = zoo_training.run_training

    def counting_run_training(model, batches, schedule, description, **options):
        trained.append(description)
        return real_run_training(model, batches, schedule, description, **options)

    monkeypatch.setattr("mergewise.zoo.micro.run_training", counting_run_training)
    build_zoo(zoo_dir, "tiny", seed=0)
    assert trained == ["expert-max"]
    assert (zoo_dir / "base" / "model.safetensors").read_bytes() == base_weights
    assert "expert-max" in json.loads((zoo_dir / "zoo.json").read_text())["models"]


def test_same_seed_gives_the_same_zoo_and_another_seed_does_not(tiny_zoo, tmp_path):
    again = tmp_path / "again"
    build_zoo(again, "tiny", seed=0)
    other = tmp_path / "other"
    build_zoo(other, "tiny", seed=1)
    for name in ["base", "expert-last"]:
        reference = load_file(tiny_zoo / name / "model.safetensors")
        same = load_file(again / name / "model.safetensors")
        assert all(torch.equal(reference[key], same[key]) for key in reference)
        different = load_file(other / name / "model.safetensors")
        assert not all(torch.equal(reference[key], different[key]) for key in reference)
    assert (tiny_zoo / "tasks/max/eval.jsonl").read_text() == (again / "tasks/max/eval.jsonl").read_text()
    assert (tiny_zoo / "tasks/max/eval.jsonl").read_text() != (other / "tasks/max/eval.jsonl").read_text()


def test_resuming_with_another_seed_or_size_is_refused(tiny_zoo):
    with pytest.raises(MergewiseError, match="zoo.json"):
        build_zoo(tiny_zoo, "tiny", seed=5)
    assert main(["zoo", "build", str(tiny_zoo), "--size", "micro"]) == 2


def test_broken_zoo_json_names_the_file_and_key(tmp_path):
    (tmp_path / "zoo.json").write_text(json.dumps({"base": "base", "tasks": {"t": {"expert": None}}}))
    with pytest.raises(MergewiseError, match=r"zoo.json: missing key 'tasks.t.calibration'"):
        load_zoo(tmp_path)
    with pytest.raises(MergewiseError, match="no zoo here"):
        load_zoo(tmp_path / "missing")


@pytest.mark.parametrize(
    "manifest, named",
    [
        (
            {
                "base": "base",
                "general": {"eval": "g.txt"},
                "tasks": {"t": {"expert": None, "calibration": "c.txt", "eval": 5, "metric": "nll"}},
            },
            "'tasks.t.eval' must be a string",
        ),
        (
            {
                "base": "base",
                "general": "g.txt",
                "tasks": {"t": {"expert": None, "calibration": "c.txt", "eval": "e.jsonl", "metric": "nll"}},
            },
            "'general' must be an object",
        ),
        ("[" * 20_000 + "]" * 20_000, "nested more than 64 levels deep"),
    ],
)
def test_a_zoo_json_of_other_types_names_the_file_and_key(manifest, named, tmp_path):
    (tmp_path / "zoo.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    with pytest.raises(MergewiseError, match=f"zoo.json: .*{re.escape(named)}"):
        load_zoo(tmp_path)


def test_eval_examples_nested_or_of_huge_numbers_are_named_by_line(tmp_path):
    (tmp_path / "zoo.json").write_text(
        json.dumps(
            {
                "base": "base",
                "general": {"eval": "g.txt"},
                "tasks": {"t": {"expert": None, "calibration": "c.txt", "eval": "e.jsonl", "metric": "nll"}},
            }
        )
    )
    for line, named in [
        ("[" * 5000 + "]" * 5000, "e.jsonl:2: nested more than 64 levels deep"),
        ('{"prompt": "a", "answer": "b", "n": ' + "9" * 5000 + "}", "e.jsonl:2: an integer of 5000"),
    ]:
        (tmp_path / "e.jsonl").write_text('{"prompt": "a", "answer": "b"}\n' + line + "\n")
        with pytest.raises(MergewiseError, match=named):
            load_zoo(tmp_path).eval_examples("t")


def test_small_zoo_reads_gsm8k_style_data_and_names_bad_lines(tmp_path):
    from mergewise.zoo.small import locate_gsm8k, math_examples

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5\n#### 5"}) + "\n")
    assert locate_gsm8k(tmp_path) == data
    assert math_examples(data) == [("Question: What is 2+3?\nAnswer:", " 2+3 = 5\n#### 5")]
    data.write_text('{"question": "no answer"}\n')
    with pytest.raises(MergewiseError, match=r"train.jsonl:1: expected an object with string 'question' and 'answer'"):
        math_examples(data)
    with pytest.raises(MergewiseError, match="--data-dir"):
        build_zoo(tmp_path / "zoo", "small", data_dir=tmp_path / "missing.jsonl")


@pytest.mark.parametrize("config_name", ["linear", "ties"])
def test_example_configs_run_through_the_merge_engine(tiny_zoo, tmp_path, config_name):
    pytest.importorskip("mergewise.engine")
    from mergewise import merge

    merge(tiny_zoo / "configs" / f"{config_name}.yml", tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model(input_ids=torch.tensor([[1, 20, 21]])).logits.shape[-1] == len(
        AutoTokenizer.from_pretrained(tmp_path / "merged")
    )


def test_comparison_recipes_find_the_zoo_given_by_a_relative_path(tiny_zoo, tmp_path, monkeypatch):
    """Zoo paths already start at the zoo's folder: `--zoo ./zoo` must not look for zoo/zoo/base."""
    from mergewise.evaluate.comparison import core_recipe, mediator_recipe, zoo_entries

    monkeypatch.chdir(tiny_zoo.parent)
    zoo = load_zoo(tiny_zoo.name)
    assert not zoo.root.is_absolute()
    for recipe in (core_recipe(zoo, "ties"), core_recipe(zoo, "linear")):
        assert Path(recipe["base_model"]).is_dir()
        assert all(Path(entry["model"]).is_dir() for entry in recipe["models"])
    experts = mediator_recipe(zoo, memory_budget=1.5)["mediator"]["experts"]
    assert all(Path(expert["model"]).is_dir() for expert in experts)
    assert all(entry.produce(tmp_path).is_dir() for entry in zoo_entries(zoo, []))
