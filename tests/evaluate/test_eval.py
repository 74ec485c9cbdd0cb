"""`mergewise eval`: JSON shape, and scores checked against direct, unbatched transformers computations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergewise.cli import main
from mergewise.errors import MergewiseError
from mergewise.evaluate import evaluate_model, load_model
from mergewise.evaluate.scoring import greedy_completions, text_nll
from mergewise.zoo import load_zoo


def direct_greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for _ in range(new_tokens):
        next_id = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, -new_tokens:], skip_special_tokens=True)


def direct_answer_nll(model, tokenizer, prompt: str, answer: str) -> tuple[float, int]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0], -1)
    return -sum(log_probs[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(answer_ids)), len(answer_ids)


def zoo_with_answers(source: Path, destination: Path, task: str, answers: list[str]) -> Path:
    """A copy of the zoo whose eval answers for `task` are replaced (models are linked, not copied)."""
    destination.mkdir()
    for entry in source.iterdir():
        if entry.is_dir() and (entry / "config.json").is_file():
            (destination / entry.name).symlink_to(entry)
        elif entry.is_dir():
            shutil.copytree(entry, destination / entry.name)
        else:
            shutil.copy(entry, destination / entry.name)
    eval_path = destination / "tasks" / task / "eval.jsonl"
    records = [json.loads(line) for line in eval_path.read_text().splitlines()]
    eval_path.write_text("".join(json.dumps({**r, "answer": a}) + "\n" for r, a in zip(records, answers)))
    return destination


def test_eval_json_and_table(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert (
        main(["eval", str(tiny_zoo / "expert-max"), "--zoo", str(tiny_zoo), "--out", str(out), "--batch-size", "5"])
        == 0
    )
    results = json.loads(out.read_text())
    assert set(results) == {"model", "zoo", "tasks", "general"}
    assert list(results["tasks"]) == ["first", "last", "max", "min", "count"]
    for entry in results["tasks"].values():
        assert entry["metric"] == "exact_match" and entry["n"] == 16 and 0 <= entry["score"] <= 1
        assert entry["answer_nll"] > 0
    assert results["general"]["metric"] == "nll" and results["general"]["n"] > 1000
    table = capsys.readouterr().out
    assert "general" in table and "max" in table and "exact_match" in table


def test_exact_match_is_one_when_answers_are_the_models_greedy_output(tiny_zoo, tmp_path):
    loaded = load_model(tiny_zoo / "base")
    prompts = [example["prompt"] for example in load_zoo(tiny_zoo).eval_examples("last")]
    greedy = [direct_greedy(loaded.model, loaded.tokenizer, prompt, 2) for prompt in prompts]
    assert greedy_completions(loaded, prompts, 2, batch_size=3, stop=()) == greedy

    # Two-character answers: whatever the greedy continuation is, exact match must count it.
    matching = zoo_with_answers(tiny_zoo, tmp_path / "matching", "last", greedy)
    assert evaluate_model(matching / "base", matching, tasks=["last"], batch_size=4)["tasks"]["last"]["score"] == 1.0
    wrong = zoo_with_answers(tiny_zoo, tmp_path / "wrong", "last", [text + "#" for text in greedy])
    assert evaluate_model(wrong / "base", wrong, tasks=["last"], batch_size=4)["tasks"]["last"]["score"] == 0.0


def test_answer_nll_matches_a_direct_computation(tiny_zoo):
    loaded = load_model(tiny_zoo / "expert-first")
    examples = load_zoo(tiny_zoo).eval_examples("first")[:10]
    totals = [direct_answer_nll(loaded.model, loaded.tokenizer, e["prompt"], e["answer"]) for e in examples]
    expected = sum(nll for nll, _ in totals) / sum(count for _, count in totals)
    result = evaluate_model(tiny_zoo / "expert-first", tiny_zoo, tasks=["first"], batch_size=3, limit=10)
    assert result["tasks"]["first"]["n"] == 10
    assert result["tasks"]["first"]["answer_nll"] == pytest.approx(expected, abs=1e-3)


def test_general_nll_matches_a_direct_computation(tiny_zoo):
    loaded = load_model(tiny_zoo / "base")
    text = "def f(x):\n    return x + 1\n" * 4
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]  # <s> + text
    expected = torch.nn.functional.cross_entropy(loaded.model(input_ids=ids).logits[0, :-1], ids[0, 1:]).item()
    total = text_nll(loaded, text, window=len(text), batch_size=2)
    assert total.tokens == len(text) and total.mean == pytest.approx(expected, abs=1e-4)
    windowed = text_nll(loaded, text, window=7, batch_size=4)
    assert windowed.tokens == len(text)


def test_bad_input_is_one_error_naming_the_culprit(tiny_zoo, tmp_path):
    with pytest.raises(MergewiseError, match="--tasks: nope"):
        evaluate_model(tiny_zoo / "base", tiny_zoo, tasks=["nope"])
    with pytest.raises(MergewiseError, match="no config.json"):
        load_model(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(MergewiseError, match="CUDA is not available"):
            load_model(tiny_zoo / "base", device="cuda")
    mediator = tmp_path / "mediator-model"
    shutil.copytree(tiny_zoo / "base", mediator)
    (mediator / "mediator").mkdir()
    with pytest.raises(MergewiseError, match="mediator.json: Mediator manifest is missing"):
        load_model(mediator)
    assert main(["eval", str(tiny_zoo / "base"), "--zoo", str(tmp_path)]) == 2


def test_an_eval_record_longer_than_a_line_may_be_is_one_error(tiny_zoo, tmp_path, capsys):
    """A record over the 16 MiB line limit came back as None among the examples: a TypeError."""
    zoo = zoo_with_answers(tiny_zoo, tmp_path / "zoo", "first", ["a"] * 16)
    eval_path = zoo / "tasks" / "first" / "eval.jsonl"
    with eval_path.open("a") as file:
        file.write(json.dumps({"prompt": "x" * (16 << 20), "answer": "a"}) + "\n")
    assert main(["eval", str(tiny_zoo / "base"), "--zoo", str(zoo), "--tasks", "first"]) == 2
    assert f"{eval_path}: evaluation examples has a line longer than {16 << 20} bytes" in capsys.readouterr().err
