"""The lm-eval-harness adapter, offline: local task YAML files over a local JSON Lines file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

import mergewise.evaluate.lm_eval_adapter  # noqa: E402,F401  (registers the "mergewise" model type)
from mergewise.evaluate import load_model  # noqa: E402
from mergewise.evaluate.scoring import greedy_completions  # noqa: E402

pytestmark = pytest.mark.integration  # lm-eval's harness end to end


def write_tasks(folder: Path, data_file: Path) -> list[str]:
    """One task per lm-eval request type, all reading `data_file` ({"prompt", "answer"} lines)."""
    dataset = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(folder / "hf-cache")},
        "test_split": "test",
    }
    tasks = {
        "mw_generate": {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
        "mw_choice": {
            "output_type": "multiple_choice",
            "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{[answer, ' #']}}",
            "doc_to_target": 0,
            "target_delimiter": "",
            "metric_list": [{"metric": "acc"}],
        },
        "mw_rolling": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{prompt}}{{answer}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        },
    }
    for name, task in tasks.items():
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **dataset, **task}))  # JSON is YAML
    return list(tasks)


@pytest.fixture(scope="module")
def tiny_mediator(tiny_zoo, tmp_path_factory) -> Path:
    """A Mediator folder over the tiny zoo's experts."""
    from mergewise.mediator.build import build
    from mergewise.zoo.manifest import load_zoo

    zoo = load_zoo(tiny_zoo)
    experts = [
        {"model": str(task.expert), "task": name, "prompts": str(task.calibration)}
        for name, task in zoo.tasks.items()
        if task.expert
    ]
    out = tmp_path_factory.mktemp("lm-eval-mediator") / "mediator"
    build({"merge_method": "linear", "base_model": str(zoo.base), "mediator": {"experts": experts}}, out, quiet=True)
    return out


@pytest.mark.parametrize("kind", ["plain", "mediator"])
def test_lm_eval_scores_a_mergewise_model_offline(tiny_zoo, tiny_mediator, tmp_path, kind):
    model_dir = tiny_zoo / "expert-max" if kind == "plain" else tiny_mediator
    data_file = tmp_path / "max.jsonl"
    prompts = [json.loads(line)["prompt"] for line in (tiny_zoo / "tasks/max/eval.jsonl").read_text().splitlines()][:8]
    # Answers are the model's own greedy output, so a correct harness run scores exactly 1.0.
    answers = greedy_completions(load_model(model_dir), prompts, max_new_tokens=4, batch_size=8)
    assert all(answers)
    data_file.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    task_names = write_tasks(tmp_path, data_file)

    output = lm_eval.simple_evaluate(
        model="mergewise",
        model_args=f"pretrained={model_dir},device=cpu",
        tasks=task_names,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        batch_size=4,
    )
    results = output["results"]
    assert set(task_names) <= set(results)
    for name in task_names:
        assert all(value == value for key, value in results[name].items() if isinstance(value, float))  # no NaN
    assert 0.0 <= results["mw_choice"]["acc,none"] <= 1.0
    assert results["mw_rolling"]["word_perplexity,none"] > 1.0
    assert results["mw_generate"]["exact_match,none"] == 1.0
