"""Published mergekit recipes, as their authors wrote them (tests/data/recipes/, each file naming its
source), run through mergekit 0.1.5 and mergewise on tiny stand-in checkpoints of the models they
name: every recipe mergekit merges, mergewise merges with the same tensors (deterministic methods)
or the same names, shapes and dtypes (methods that sample); every recipe mergekit refuses,
mergewise refuses with one `error:` line."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import mergewise
from mergewise.cli import main
from mergewise.errors import RecipeWarning
from mergewise.methods import METHODS
from tests.support.peer import checkpoint_mismatches
from tests.support.shared import fill_in_parts, run_wide_folder
from tests.support.stand_ins import PreparedRecipe, StandIns
from tests.support.tiny_models import read_state_dict

CORPUS = Path(__file__).parent / "data" / "recipes"
RECIPES = sorted(CORPUS.glob("*.yml"))
RUNNER = Path(__file__).parent / "support" / "mergekit_runner.py"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.peer,
    pytest.mark.skipif(
        importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed (pip install '.[peer]')"
    ),
]


# The kinds of key published recipes hold that mergekit ignores, or reads its own way, each on its
# own: (recipe, what mergewise's warning names).
EDGE_CASES = {
    "top-level-name-normalize-select-topk": (
        """
name: stage-one
merge_method: sce
base_model: org/base
normalize: false
select_topk: 0.5
models:
  - model: org/math
  - model: org/code
dtype: bfloat16
""",
        ["name: unknown key", "normalize: unknown key", "select_topk: a parameter of sce written at the top level"],
    ),
    "revision-on-a-slice-source": (
        """
merge_method: slerp
base_model: org/base
slices:
  - sources:
      - {model: org/base, layer_range: [0, 4], revision: main}
      - {model: org/chat, layer_range: [0, 4], revision: v2}
parameters: {t: 0.3}
dtype: bfloat16
""",
        [
            "slices[0].sources[1].revision: read as the model's revision (org/chat@v2)",
            "org/chat is a local folder; its revision 'v2' is ignored",
        ],
    ),
    "weight-under-model-stock": (
        """
merge_method: model_stock
base_model: org/base
models:
  - {model: org/math, parameters: {weight: 0.7}}
  - {model: org/code, parameters: {weight: 0.3}}
dtype: bfloat16
""",
        ["models[0].parameters.weight: unknown parameter for merge_method model_stock"],
    ),
    "weight-under-arcee-fusion": (
        """
merge_method: arcee_fusion
base_model: org/base
models:
  - {model: org/chat, parameters: {weight: 1.0}}
dtype: float32
""",
        ["models[0].parameters.weight: unknown parameter for merge_method arcee_fusion"],
    ),
    "normalize-and-lambda-under-sce": (
        """
merge_method: sce
base_model: org/base
models:
  - model: org/math
  - model: org/code
parameters: {select_topk: 0.4, normalize: true, lambda: 1.1}
dtype: bfloat16
""",
        [
            "parameters.normalize: unknown parameter for merge_method sce",
            "parameters.lambda: unknown parameter for merge_method sce",
        ],
    ),
    "chat-template-auto-without-templates": (
        """
merge_method: linear
models:
  - {model: org/math, parameters: {weight: 0.5}}
  - {model: org/code, parameters: {weight: 0.5}}
chat_template: auto
dtype: bfloat16
""",
        ["chat_template: auto, but none of the input models has a chat template"],
    ),
    "slice-of-only-the-base": (
        """
merge_method: task_arithmetic
base_model: org/base
slices:
  - sources:
      - {model: org/base, layer_range: [0, 2]}
  - sources:
      - {model: org/base, layer_range: [2, 4]}
      - {model: org/math, layer_range: [2, 4], parameters: {weight: 0.8}}
dtype: bfloat16
""",
        ["slices[0]: merge_method task_arithmetic gets only the base model here"],
    ),
    "arcee-fusion-in-bf16": (
        """
merge_method: arcee_fusion
base_model: org/base
models:
  - model: org/chat
dtype: bfloat16
""",
        ["mergekit 0.1.5 writes this method's tensors in float32"],
    ),
}


CORPUS_PARTS = 2  # mergekit's runs in parts, which two xdist workers arriving together share


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[PreparedRecipe, dict]]:
    """Each recipe (published or edge case) in its work folder, with mergekit's outcome (merged into
    `<folder>/mergekit`); prepared once per run, by whichever workers ask."""
    with run_wide_folder(tmp_path_factory, "corpus") as root:
        if not (root / "prepared.json").exists():
            _prepare_corpus(root)
    fill_in_parts(root, CORPUS_PARTS, functools.partial(_run_part, root))
    prepared = {
        name: PreparedRecipe(Path(source), Path(recipe), Path(folder), method)
        for name, (source, recipe, folder, method) in json.loads((root / "prepared.json").read_text()).items()
    }
    results = {}
    for part in range(CORPUS_PARTS):
        results |= json.loads((root / f"results-{part}.json").read_text())
    return {name: (entry, results[name]) for name, entry in prepared.items()}


def _prepare_corpus(root: Path) -> None:
    """Every recipe beside its stand-ins; prepared.json, written last, lists them."""
    edge_cases = root / "edge-cases"
    edge_cases.mkdir(exist_ok=True)
    for name, (text, _) in EDGE_CASES.items():
        (edge_cases / f"{name}.yml").write_text(text.lstrip())
    stand_ins = StandIns(root / "stand-ins")
    prepared = {
        path.name: stand_ins.prepare(path, root / path.stem) for path in [*RECIPES, *sorted(edge_cases.glob("*.yml"))]
    }
    listing = {
        name: [str(entry.source), str(entry.recipe), str(entry.folder), entry.merge_method]
        for name, entry in prepared.items()
    }
    (root / "prepared.json").write_text(json.dumps(listing))


def _run_part(root: Path, part: int) -> None:
    """mergekit on every CORPUS_PARTS-th recipe from `part` on (results-PART.json)."""
    listing = json.loads((root / "prepared.json").read_text())
    jobs = [
        {"name": name, "recipe": recipe, "out": str(Path(folder) / "mergekit"), "cwd": folder}
        for name, (_, recipe, folder, _) in sorted(listing.items())[part::CORPUS_PARTS]
    ]
    (root / f"jobs-{part}.json").write_text(json.dumps(jobs))
    subprocess.run(
        [sys.executable, str(RUNNER), str(root / f"jobs-{part}.json"), str(root / f"results-{part}.json")],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _merged_as_mergekit(name: str, entry: PreparedRecipe, out: Path) -> None:
    """mergewise's output against mergekit's: the same tensors, or the same layout for methods that
    sample."""
    theirs = entry.folder / "mergekit"
    method = entry.merge_method
    if METHODS[method].uses_randomness:
        ours_state, theirs_state = read_state_dict(out), read_state_dict(theirs)
        layout = {key: (tuple(value.shape), value.dtype) for key, value in ours_state.items()}
        assert layout == {key: (tuple(value.shape), value.dtype) for key, value in theirs_state.items()}
    else:
        mismatches = checkpoint_mismatches(out, theirs, method=method)
        assert not mismatches, f"{name}: {len(mismatches)} tensors differ:\n" + "\n".join(mismatches[:20])


def test_the_corpus_is_large_and_every_file_names_its_source():
    assert len(RECIPES) >= 50
    for path in RECIPES:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# source: "), path.name


@pytest.mark.parametrize("name", [path.name for path in RECIPES])
def test_published_recipe_runs_as_in_mergekit(name, corpus, tmp_path, monkeypatch, capsys):
    entry, mergekit = corpus[name]
    monkeypatch.chdir(entry.folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "merged"
    if not mergekit["merged"]:
        status = main(["merge", str(entry.recipe), str(out), "--quiet"])
        lines = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in lines if not line.startswith("warning: ")]
        assert status == 2 and len(errors) == 1 and errors[0].startswith("error: "), (
            f"mergekit refused {name} ({mergekit['error']}) but mergewise gave status {status}:\n" + "\n".join(lines)
        )
        assert not out.exists()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("always", RecipeWarning)
        mergewise.merge(entry.recipe, out, seed=0, quiet=True)
    _merged_as_mergekit(name, entry, out)


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_what_mergekit_ignores_merges_as_mergekit_merges_it_and_is_named(case, corpus, tmp_path, monkeypatch):
    entry, mergekit = corpus[f"{case}.yml"]
    monkeypatch.chdir(entry.folder)
    assert mergekit["merged"], mergekit.get("error")
    with pytest.warns(RecipeWarning) as warned:
        mergewise.merge(entry.recipe, tmp_path / "merged", seed=0, quiet=True)
    messages = "\n".join(str(warning.message) for warning in warned if warning.category is RecipeWarning)
    for fragment in EDGE_CASES[case][1]:
        assert fragment in messages, f"{fragment!r} not in:\n{messages}"
    _merged_as_mergekit(case, entry, tmp_path / "merged")


def test_check_prints_the_plan_and_warnings_and_strict_refuses(corpus, tmp_path):
    """`mergewise merge --check` through the console command: one `warning:` line per ignored key, a
    line saying what the merge would write, nothing written; with --strict, one `error:` line."""
    entry, _ = corpus["top-level-name-normalize-select-topk.yml"]
    command = [sys.executable, "-m", "mergewise.cli", "merge", "--check", str(entry.recipe)]
    checked = subprocess.run(command, cwd=entry.folder, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    warned = checked.stderr.strip().splitlines()
    assert len(warned) == 3 and all(line.startswith("warning: ") for line in warned), checked.stderr
    assert "sce of 2 model(s) onto base" in checked.stdout and " tensors, " in checked.stdout
    refused = subprocess.run([*command, "--strict"], cwd=entry.folder, capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {entry.recipe}: name: unknown key, ignored, as mergekit ignores it (it names one stage of a "
        "multi-stage recipe) (refused: --strict)"
    ]
    assert sorted(path.name for path in entry.folder.iterdir() if path.is_file()) == [entry.recipe.name]
