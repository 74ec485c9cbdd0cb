"""mergewise against mergekit on the same YAML recipes over bf16 model families.

Deterministic methods must give identical tensors, on tiny models (tensors of a few thousand
entries) and at real size: a one-layer Llama whose tensors have 0.5–2 M entries, so that row
chunking, the magnitude selection among the many ties of bf16 task vectors and the fused bf16
kernels all run as on a real model, in bf16 and in float32 recipes. The exception is the angle of
`model_stock` and of `nuslerp` on a tensor of several row chunks: it comes from whole-tensor sums,
which torch accumulates in float32 in an order that depends on the tensor's length and thread count,
and which mergewise adds chunk by chunk in float64 (docs/reference/agreement.md); there the merged tensors must agree
to a relative error of 1e-6. The weights of `sce` (mean squares of the task vectors) are such sums
too. On tensors of over 1 M entries mergekit estimates `arcee_fusion`'s quartiles from a random
sample drawn from torch's global generator, which no recipe seed fixes, where mergewise takes them
exactly; its fence can move by a step there, so those tensors must agree to a relative error of
1e-3 (and mergekit writes its arcee_fusion tensors in float32 whatever the recipe's dtype, so they are
rounded to mergewise's first; so does ramplus_tl, whose float32 scale promotes its sum). `karcher`
and `multislerp` hang on whole-tensor norms and dot products too, some of which mergekit takes in
float32 (all of karcher's norms); on a tensor of several chunks these carry torch's float32
accumulation error (5e-5 of a 2 M-entry norm) where mergewise's are exact, and bf16 roundings of
unit vectors and outputs amplify it, so there they must agree within SPHERICAL_MEAN_TOLERANCE (a
tensor of one chunk gets torch's own figures and is identical). Random methods (DARE, DELLA) are compared by statistics
of the merged update. mergekit runs all recipes in one process, since its start-up costs seconds;
mergewise runs in-process.

If a magnitude method (ties, breadcrumbs*) differs after a torch upgrade, look at tie order first
(`tests/test_sort_order.py`): 1 % updates of bf16 weights are a few ulps, so a large share of
|delta| ties at the cut, and which tied entries survive is the order torch's CPU sort leaves them in.

Both tools leave a tied `lm_head` out of tied-embedding checkpoints (Gemma, GPT-2); mergekit cannot
write a Qwen2 frankenmerge (MERGEKIT_CANNOT).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import mergewise
from tests.support.peer import checkpoint_mismatches
from tests.support.shared import fill_in_parts, run_wide_folder
from tests.support.tiny_models import Family, build_family, read_state_dict

MERGEKIT_YAML = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.peer,
    pytest.mark.skipif(
        not MERGEKIT_YAML, reason="mergekit-yaml not found on PATH nor in $MERGEKIT_YAML (pip install '.[peer]')"
    ),
]

NUM_LAYERS = 4  # enough layers for gradients and layer-range slices to mean something
SEED = 0
PEER_PARTS = 2  # mergekit's runs in parts, which two xdist workers arriving together share

Recipe = Callable[[Family], dict]


def _task_vectors(family: Family, *parameters: dict) -> list[dict]:
    """The base (no parameters) followed by fine-tune i with `parameters[i]`."""
    entries = [{"model": str(family.base)}]
    return entries + [{"model": str(path), "parameters": p} for path, p in zip(family.fine_tunes, parameters)]


def _no_base(family: Family, *weights: float) -> list[dict]:
    return [{"model": str(path), "parameters": {"weight": w}} for path, w in zip(family.fine_tunes, weights)]


def _recipe(method: str, family: Family, models: list[dict], base: bool = True, **parameters) -> dict:
    recipe = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if base:
        recipe["base_model"] = str(family.base)
    if parameters:
        recipe["parameters"] = parameters
    return recipe


ATTENTION_FILTER = [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]

RECIPES: dict[str, Recipe] = {
    "linear": lambda f: _recipe("linear", f, _no_base(f, 0.5, 0.3, 0.2), base=False),
    "linear_gradient_unnormalized": lambda f: _recipe(
        "linear",
        f,
        [
            {"model": str(f.fine_tunes[0]), "parameters": {"weight": [0, 0.5, 1]}},
            {"model": str(f.fine_tunes[1]), "parameters": {"weight": ATTENTION_FILTER}},
        ],
        base=False,
        normalize=False,
    ),
    "task_arithmetic": lambda f: _recipe(
        "task_arithmetic",
        f,
        _task_vectors(f, {"weight": 0.5}, {"weight": 0.3}, {"weight": ATTENTION_FILTER}),
        **{"lambda": 0.8},
    ),
    "ties": lambda f: _recipe(
        "ties",
        f,
        _task_vectors(
            f, {"weight": 0.4, "density": 0.5}, {"weight": 0.3, "density": 0.7}, {"weight": 0.3, "density": 0.3}
        ),
        int8_mask=True,
    ),
    "ties_unnormalized_gradient": lambda f: _recipe(
        "ties",
        f,
        _task_vectors(f, {"weight": [0.2, 0.6, 1.0], "density": 0.6}, {"weight": 0.5, "density": [0.9, 0.4]}),
        normalize=False,
        **{"lambda": 1.2},
    ),
    "breadcrumbs": lambda f: _recipe(
        "breadcrumbs", f, _task_vectors(f, *[{"weight": 0.4, "density": 0.8, "gamma": 0.05}] * 3)
    ),
    "breadcrumbs_ties": lambda f: _recipe(
        "breadcrumbs_ties",
        f,
        _task_vectors(f, {"weight": 0.5, "density": 0.9, "gamma": 0.02}, {"weight": 0.5, "density": 0.7, "gamma": 0.1}),
    ),
    "slerp": lambda f: _recipe(
        "slerp",
        f,
        [{"model": str(f.base)}, {"model": str(f.fine_tunes[0])}],
        t=[{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.4}],
    ),
    "nuslerp": lambda f: _recipe("nuslerp", f, _task_vectors(f, {"weight": 0.4}, {"weight": 0.6})),
    "nuslerp_rowwise_no_base": lambda f: _recipe(
        "nuslerp", f, _no_base(f, 0.7, 0.3), base=False, nuslerp_flatten=False, nuslerp_row_wise=True
    ),
    "model_stock": lambda f: _recipe("model_stock", f, _task_vectors(f, {}, {}, {})),
    "sce": lambda f: _recipe("sce", f, _task_vectors(f, {}, {}, {}), select_topk=0.5),
    "sce_gradient_int8_mask": lambda f: _recipe(
        "sce",
        f,
        [{"model": str(path)} for path in f.fine_tunes[:2]],
        select_topk=[{"filter": "mlp", "value": [0.1, 1.0]}, {"value": 0.3}],
        int8_mask=True,
    ),
    "nearswap": lambda f: _recipe(
        "nearswap",
        f,
        [{"model": str(f.base)}, {"model": str(f.fine_tunes[0])}],
        t=[{"filter": "self_attn", "value": 1e-4}, {"value": 5e-4}],
    ),
    "arcee_fusion": lambda f: _recipe("arcee_fusion", f, [{"model": str(f.base)}, {"model": str(f.fine_tunes[0])}]),
    # The base is one more input of karcher (mergekit adds it to the models).
    "karcher": lambda f: _recipe("karcher", f, [{"model": str(path)} for path in f.fine_tunes], max_iter=5),
    "multislerp": lambda f: _recipe(
        "multislerp", f, _task_vectors(f, {"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2})
    ),
    "multislerp_no_base_unnormalized": lambda f: _recipe(
        "multislerp", f, _no_base(f, 0.7, 0.6), base=False, normalize_weights=False
    ),
    # epsilon about a tiny model's typical |delta|, so entries changed by one, several and no model mix.
    "ram": lambda f: _recipe("ram", f, _task_vectors(f, {}, {}, {}), epsilon=2e-4),
    "ramplus_tl": lambda f: _recipe("ramplus_tl", f, _task_vectors(f, {}, {}, {}), epsilon=2e-4, r=0.5, alpha=0.6),
    "passthrough_frankenmerge": lambda f: {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "slices": [
            {"sources": [{"model": str(f.fine_tunes[0]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(f.fine_tunes[1]), "layer_range": [1, NUM_LAYERS]}]},
        ],
    },
}

# One fine-tune of weight 1, so `output − base` is exactly its sparsified (and rescaled) delta.
SPARSE_DENSITIES = {"ties": 0.5, "dare_linear": 0.3, "dare_ties": 0.3, "della": 0.4, "della_linear": 0.4}


def _one_sparsified_fine_tune(method: str, density: float) -> Recipe:
    return lambda family: _recipe(method, family, _task_vectors(family, {"weight": 1.0, "density": density}))


SPARSE_RECIPES = {method: _one_sparsified_fine_tune(method, density) for method, density in SPARSE_DENSITIES.items()}

# mergekit 0.1.5 keeps Qwen2's per-layer `layer_types` at the input depth, which transformers 5
# refuses to save, so it cannot write a Qwen2 frankenmerge.
MERGEKIT_CANNOT = {("qwen2", "passthrough_frankenmerge")}
# Every recipe on Llama and Qwen2 (attention biases); tied-embedding families on a subset.
CASES = [(arch, name) for arch in ("llama", "qwen2") for name in RECIPES if (arch, name) not in MERGEKIT_CANNOT]
TIED_EMBEDDING_RECIPES = ("linear", "ties", "slerp", "passthrough_frankenmerge")
CASES += [(arch, name) for arch in ("gemma", "gpt2") for name in TIED_EMBEDDING_RECIPES]
SPARSE_ARCH = "llama"
# Fine-tunes 50 % away from the base (angles of ~0.5 rad), so that karcher takes its steps in bf16 too:
# near ones have bf16 cosines of exactly 1.
FAR_NOISE = 0.5
FAR_RECIPES = ("karcher", "multislerp", "multislerp_no_base_unnormalized")
FAR_CASES = [f"{SPARSE_ARCH}-far-{name}" for name in FAR_RECIPES]
# A one-layer Llama whose tensors have 0.5 M (k/v), 1 M (q/o/mlp) and 2 M (embeddings) entries.
REAL_SIZE = {
    "num_layers": 1,
    "hidden_size": 1024,
    "intermediate_size": 1024,
    "vocab_size": 2048,
    "num_heads": 16,
    "num_kv_heads": 8,
}
REAL_SIZE_RECIPES = [name for name in RECIPES if name != "passthrough_frankenmerge"]  # needs 4 layers
REAL_SIZE_CASES = [f"real-{dtype}-{name}" for dtype in ("bfloat16", "float32") for name in REAL_SIZE_RECIPES]


@dataclass(frozen=True)
class PeerRun:
    config: Path
    mergekit_out: Path
    family: Family

    def mergewise_out(self, out_dir: Path) -> Path:
        """Merged on every core, as both tools' commands do: a reduction's order follows the thread
        count (model_stock's whole-tensor cosines in bf16 differ by an ulp between 1 and 2 threads)."""
        return Path(mergewise.merge(self.config, out_dir, seed=SEED, quiet=True, threads=os.cpu_count()))


def _run_mergekit(recipes: dict[str, dict], root: Path, listing: str = "all.yaml") -> dict[str, Path]:
    """Run every recipe through mergekit; `mergekit-multi` beside `mergekit-yaml` does it in one process."""
    options = ["--no-cuda", "--quiet", "--no-write-model-card", "--random-seed", str(SEED)]
    multi = Path(MERGEKIT_YAML).with_name("mergekit-multi")
    if multi.exists():
        documents = [{"name": name, **recipe} for name, recipe in recipes.items()]
        (root / listing).write_text(yaml.safe_dump_all(documents, sort_keys=False))
        commands = [[str(multi), str(root / listing), "-I", str(root / "mergekit")] + options]
    else:
        commands = [
            [MERGEKIT_YAML, str(root / "recipes" / f"{name}.yaml"), str(root / "mergekit" / name)] + options
            for name in recipes
        ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"mergekit failed:\n{result.stderr[-4000:]}"
    return {name: root / "mergekit" / name for name in recipes}


def _write_cases(root: Path) -> None:
    """Every case's families and recipe (recipes/CASE.yaml); cases.json, written last, names each
    case's family folder."""
    families: dict[str, Family] = {}

    def family(label: str, arch: str, **options) -> Family:
        if label not in families:
            families[label] = build_family(arch, root / "families" / label, **options)
        return families[label]

    recipes, family_of = {}, {}
    for arch, name in CASES:
        recipes[f"{arch}-{name}"] = RECIPES[name](family(arch, arch, num_layers=NUM_LAYERS))
        family_of[f"{arch}-{name}"] = arch
    for method, make in SPARSE_RECIPES.items():
        recipes[f"{SPARSE_ARCH}-sparse-{method}"] = make(family(SPARSE_ARCH, SPARSE_ARCH, num_layers=NUM_LAYERS))
        family_of[f"{SPARSE_ARCH}-sparse-{method}"] = SPARSE_ARCH
    for case, name in zip(FAR_CASES, FAR_RECIPES):
        recipes[case] = RECIPES[name](family("far", SPARSE_ARCH, num_layers=NUM_LAYERS, noise=FAR_NOISE))
        family_of[case] = "far"
    for case in REAL_SIZE_CASES:
        _, dtype, name = case.split("-", 2)
        recipes[case] = RECIPES[name](family("real", "llama", **REAL_SIZE)) | {"dtype": dtype}
        family_of[case] = "real"
    (root / "recipes").mkdir(exist_ok=True)
    for name, recipe in recipes.items():
        (root / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (root / "cases.json").write_text(json.dumps(family_of))


def _run_part(root: Path, part: int) -> None:
    """mergekit on every PEER_PARTS-th case from `part` on (mergekit/CASE)."""
    cases = sorted(json.loads((root / "cases.json").read_text()))[part::PEER_PARTS]
    recipes = {case: yaml.safe_load((root / "recipes" / f"{case}.yaml").read_text()) for case in cases}
    _run_mergekit(recipes, root, f"part-{part}.yaml")


@pytest.fixture(scope="module")
def peer_runs(tmp_path_factory) -> dict[str, PeerRun]:
    """mergekit's output of every case, run once per test run by whichever worker asks first."""
    with run_wide_folder(tmp_path_factory, "peer-mergekit") as root:
        if not (root / "cases.json").exists():
            _write_cases(root)
        family_of = json.loads((root / "cases.json").read_text())
    fill_in_parts(root, PEER_PARTS, functools.partial(_run_part, root))
    return {
        case: PeerRun(root / "recipes" / f"{case}.yaml", root / "mergekit" / case, _family_in(root, label))
        for case, label in family_of.items()
    }


def _family_in(root: Path, label: str) -> Family:
    folder = root / "families" / label
    return Family(folder / "base", tuple(sorted(folder.glob("ft*"))))


@pytest.mark.parametrize("case", [f"{arch}-{name}" for arch, name in CASES] + FAR_CASES + REAL_SIZE_CASES)
def test_matches_mergekit(case, peer_runs, tmp_path):
    run = peer_runs[case]
    method = yaml.safe_load(run.config.read_text())["merge_method"]

    mismatches = checkpoint_mismatches(run.mergewise_out(tmp_path / "merged"), run.mergekit_out, method=method)

    assert not mismatches, f"{case}: {len(mismatches)} tensors differ:\n" + "\n".join(mismatches)


def update_statistics(merged: Path, family: Family) -> tuple[float, float]:
    """(share of entries the merge changed, L1 of the merged update / L1 of the fine-tune's delta)."""
    base, fine_tune, out = (read_state_dict(path) for path in (family.base, family.fine_tunes[0], merged))
    changed = total = 0
    update_l1 = delta_l1 = 0.0
    for name, tensor in base.items():
        update = out[name].float() - tensor.float()
        changed += int((update != 0).sum())
        total += tensor.numel()
        update_l1 += update.abs().sum().item()
        delta_l1 += (fine_tune[name].float() - tensor.float()).abs().sum().item()
    return changed / total, update_l1 / delta_l1


@pytest.mark.parametrize("method", SPARSE_RECIPES)
def test_sparsified_update_matches_mergekit(method, peer_runs, tmp_path):
    """Same kept share and update size as mergekit (~180k entries: 2 % is ~4 standard deviations).

    For TIES this holds on bf16 data even though the kept set depends on the tie order: top-k keeps
    exactly k entries, however many deltas tie at the threshold.
    """
    run = peer_runs[f"{SPARSE_ARCH}-sparse-{method}"]

    ours = update_statistics(run.mergewise_out(tmp_path / "merged"), run.family)
    theirs = update_statistics(run.mergekit_out, run.family)

    assert ours == pytest.approx(theirs, rel=0.02), f"(kept share, L1 ratio): mergewise {ours}, mergekit {theirs}"
