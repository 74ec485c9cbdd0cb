"""Conflict analysis (docs/mediator.md, Analysis) on hand-built experts whose task vectors are set exactly, so the
sign conflict d, the cancellation c and the cosines have known values; the streamed row chunks against
the whole-tensor formulas, on both sides of the one-chunk switch; the chunk observers; then the report
files, the output-folder rules and the errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergewise.cli import main
from mergewise.errors import MergewiseError
from mergewise.mediator.analysis import (
    ConflictReport,
    analyze_conflicts,
    analyze_to_folder,
    kept_entries,
    magnitude_cuts,
)
from mergewise.mediator.settings import load_recipe
from mergewise.mediator.units import unit_of
from mergewise.methods.sparsify import kept_count
from tests.support.tiny_models import build_tiny_model, read_state_dict

# Units of the tiny llama, in the order its tensors come in the checkpoint.
UNITS = ["lm_head", "model.embed_tokens", "layers.0", "layers.1", "model.norm"]
TASKS = ["a", "b", "c"]
# Chunk sizes on both sides of the switch: every tiny tensor in one chunk (read once), or the 2-D ones
# in many row chunks (15 rows of 64, read again on each pass).
ONE_CHUNK, SEVERAL_CHUNKS = 1 << 20, 1000


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("analysis") / "base", dtype=torch.float32)


@pytest.fixture(scope="module")
def base_state(base) -> dict[str, torch.Tensor]:
    return read_state_dict(base)


def write_expert(
    base: Path,
    out: Path,
    deltas: dict[str, torch.Tensor],
    *,
    drop: tuple[str, ...] = (),
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A copy of `base` with weights base + deltas[name] (τ = 0 where no delta is given)."""
    out.mkdir(parents=True)
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy2(file, out / file.name)
    state = {
        name: tensor + deltas[name] if name in deltas else tensor
        for name, tensor in read_state_dict(base).items()
        if name not in drop
    }
    save_file({**state, **(extra or {})}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def recipe(base: Path, experts: list[Path], **mediator) -> dict:
    entries = [{"model": str(path), "task": task} for path, task in zip(experts, TASKS)]
    return {"merge_method": "linear", "base_model": str(base), "mediator": {"experts": entries, **mediator}}


def analyze(base: Path, experts: list[Path], chunk_elements: int = ONE_CHUNK, **mediator) -> ConflictReport:
    return analyze_conflicts(load_recipe(recipe(base, experts, **mediator)), quiet=True, chunk_elements=chunk_elements)


def random_deltas(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.05 * torch.randn(tensor.shape, generator=generator) for name, tensor in state.items()}


def every_other(delta: torch.Tensor) -> torch.Tensor:
    """The even flat entries only; every tensor has an even size, so a roll by one is disjoint."""
    mask = torch.arange(delta.numel()) % 2 == 0
    return (delta.flatten() * mask).reshape(delta.shape)


def rolled(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten().roll(1).reshape(delta.shape)


PAIRS = {  # name: (τ_a from τ, τ_b from τ, d, c, cosine)
    "identical": (lambda t: t, lambda t: t, 0.0, 0.0, 1.0),
    "opposite": (lambda t: t, lambda t: -t, 1.0, 1.0, -1.0),
    "orthogonal": (every_other, lambda t: rolled(every_other(t)), 0.0, 1 - math.sqrt(2) / 2, 0.0),
}


@pytest.mark.parametrize("case", PAIRS)
def test_two_experts_with_known_relation(case, base, base_state, tmp_path):
    first, second, sign_conflict, cancellation, cosine = PAIRS[case]
    deltas = random_deltas(base_state)
    experts = [
        write_expert(base, tmp_path / task, {name: make(delta) for name, delta in deltas.items()})
        for task, make in zip(TASKS, (first, second))
    ]
    report = analyze(base, experts)
    assert report.tasks == ["a", "b"]
    assert [unit.unit for unit in report.units] == UNITS
    for unit in report.units:
        assert unit.sign_conflict == pytest.approx(sign_conflict, abs=1e-6), unit.unit
        assert unit.cancellation == pytest.approx(cancellation, abs=1e-5), unit.unit
        assert np.allclose(unit.cosines, [[1.0, cosine], [cosine, 1.0]], atol=1e-5), unit.unit
        assert unit.parameters == sum(base_state[name].numel() for name in unit.tensors)
    assert np.allclose(report.overall_cosines, [[1.0, cosine], [cosine, 1.0]], atol=1e-5)
    assert sorted(name for unit in report.units for name in unit.tensors) == sorted(base_state)


def test_sign_conflict_weighs_only_entries_kept_by_two_experts(base, base_state, tmp_path):
    # Per expert the top 4 of the 64 entries of model.norm.weight are kept (conflict_density 1/16):
    #   a keeps 0..3 (+5 +4 +3 +2; its +1 at entry 4 is cut); b keeps 1..4 (+2 -3 +4 +5; its -1 at 0 is cut);
    #   c keeps 0, 5, 6, 7 (-6 +7 +8 +9).  Shared: entry 0 (a, c disagree, weight 11), 1 (agree, 6),
    #   2 (disagree, 6), 3 (agree, 6); entries 4..7 are kept by one expert only.  d = 17 / 29.
    values = {
        "a": {0: 5, 1: 4, 2: 3, 3: 2, 4: 1},
        "b": {0: -1, 1: 2, 2: -3, 3: 4, 4: 5},
        "c": {0: -6, 5: 7, 6: 8, 7: 9},
    }
    background = 0.01 * (-1.0) ** torch.arange(base_state["model.norm.weight"].numel())  # below every cut
    experts = []
    for task, entries in values.items():
        delta = background.clone()
        for index, value in entries.items():
            delta[index] = value
        experts.append(write_expert(base, tmp_path / task, {"model.norm.weight": delta}))
    report = analyze(base, experts, conflict_density=1 / 16)
    by_unit = {unit.unit: unit for unit in report.units}
    assert by_unit["model.norm"].sign_conflict == pytest.approx(17 / 29, abs=1e-5)
    for name in UNITS[:-1]:  # τ = 0 there: nothing kept, nothing cancels, no direction
        assert (by_unit[name].sign_conflict, by_unit[name].cancellation) == (0.0, 0.0)
        assert by_unit[name].cosines == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def kept_mask(magnitudes: np.ndarray, share: float) -> np.ndarray:
    """The whole-tensor reference: the top-`share` entries by a sort (ties at the cut kept, zeros never)."""
    keep = kept_count(magnitudes.size, share)
    if keep >= magnitudes.size:
        return magnitudes > 0
    threshold = np.partition(magnitudes, magnitudes.size - keep)[magnitudes.size - keep]
    return (magnitudes >= threshold) & (magnitudes > 0)


def kept(vectors: np.ndarray, share: float, pieces: int = 1) -> np.ndarray:
    """What `kept_entries` keeps of `vectors` (tasks × entries) when its cuts come from `pieces` chunks."""
    tensor = torch.from_numpy(vectors)
    chunks = list(tensor.tensor_split(pieces, dim=1))
    return kept_entries(tensor, magnitude_cuts(chunks, len(vectors), vectors.shape[1], share)).numpy()


def test_cuts_keep_ties_at_the_cut_and_never_zeros():
    magnitudes = np.array([[3.0, 1.0, 2.0, 2.0, 0.5]], dtype=np.float32)
    assert kept(-magnitudes, 0.4).tolist() == [[True, False, True, True, False]]
    assert kept(np.array([[0.0, 0.0, -0.0, 1.0]], dtype=np.float32), 1.0).tolist() == [[False, False, False, True]]
    assert kept(np.array([[0.0, 0.0, 0.0, 1.0]], dtype=np.float32), 0.75).tolist() == [[False, False, False, True]]


@pytest.mark.parametrize("pieces", [1, 3, 64])
@pytest.mark.parametrize("share", [0.0, 0.01, 0.2, 0.5, 0.999, 1.0])
def test_cuts_over_row_chunks_are_those_of_a_whole_tensor_sort(pieces, share):
    generator = np.random.default_rng(7)
    size = 4096
    tied = np.round(generator.standard_normal(size) * 3) / 4  # few values: long runs of ties at every cut
    near = 1 + generator.integers(0, 8, size) * np.float32(2**-23)  # one upper-16-bit bucket, 8 lower values
    tiny = generator.integers(0, 4, size) * np.float32(1e-45)  # subnormals and zeros
    spread = generator.standard_normal(size) * 10.0 ** generator.integers(-30, 30, size)
    vectors = np.stack([tied, near, tiny, spread, -near]).astype(np.float32)
    reference = np.stack([kept_mask(np.abs(row), share) for row in vectors])
    assert (kept(vectors, share, pieces) == reference).all()


@pytest.mark.parametrize("chunk_elements", [ONE_CHUNK, SEVERAL_CHUNKS])
@pytest.mark.parametrize("share", [0.2, 0.03, 1.0])
def test_streamed_report_equals_the_whole_tensor_formulas(chunk_elements, share, base, base_state, tmp_path):
    generator = torch.Generator().manual_seed(3)
    experts, states = [], []
    for index, task in enumerate(TASKS):  # gaussian updates, and coarse ones with ties at the cuts
        deltas = {name: 0.05 * torch.randn(tensor.shape, generator=generator) for name, tensor in base_state.items()}
        if index:
            deltas = {
                name: (delta * 8).round() / 8 if "mlp" in name or "embed" in name else delta
                for name, delta in deltas.items()
            }
        experts.append(write_expert(base, tmp_path / task, deltas))
        states.append(read_state_dict(experts[-1]))
    report = analyze(base, experts, chunk_elements, conflict_density=share)
    reference = reference_units(base_state, states, share)
    assert [unit.unit for unit in report.units] == list(reference)
    for unit in report.units:
        expected = reference[unit.unit]
        assert unit.parameters == expected["parameters"]
        assert unit.sign_conflict == pytest.approx(expected["sign_conflict"], rel=1e-12, abs=1e-15), unit.unit
        assert unit.cancellation == pytest.approx(expected["cancellation"], rel=1e-9, abs=1e-12), unit.unit
        assert np.allclose(unit.cosines, expected["cosines"], rtol=0, atol=2e-6), unit.unit


def reference_units(
    base_state: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], share: float
) -> dict[str, dict]:
    """Every unit's figures by the whole-tensor formulas: each tensor's task vectors in memory at once."""
    sums: dict[str, dict] = {}
    for name, tensor in base_state.items():
        vectors = np.stack([(state[name].float() - tensor.float()).reshape(-1).numpy() for state in states])
        magnitudes = np.abs(vectors)
        mask = np.stack([kept_mask(row, share) for row in magnitudes])
        shared = mask.sum(0) >= 2
        signs = np.where(mask[:, shared], np.sign(vectors[:, shared]), 0)
        disagree = (signs > 0).any(0) & (signs < 0).any(0)
        weights = np.where(mask[:, shared], magnitudes[:, shared], 0).sum(0, dtype=np.float64)
        wide = vectors.astype(np.float64)
        unit = sums.setdefault(
            unit_of(name), {"parameters": 0, "conflict": 0.0, "weight": 0.0, "sum_square": 0.0, "gram": 0.0}
        )
        unit["parameters"] += vectors.shape[1]
        unit["conflict"] += float(weights[disagree].sum())
        unit["weight"] += float(weights.sum())
        unit["sum_square"] += float(np.square(wide.sum(0)).sum())
        unit["gram"] = unit["gram"] + wide @ wide.T
    for unit in sums.values():
        norms = np.sqrt(np.diag(unit["gram"]))
        unit["sign_conflict"] = unit["conflict"] / unit["weight"] if unit["weight"] > 0 else 0.0
        unit["cancellation"] = 1 - np.sqrt(unit["sum_square"]) / norms.sum()
        unit["cosines"] = unit["gram"] / np.outer(norms, norms)
    return sums


@pytest.mark.parametrize("chunk_elements", [ONE_CHUNK, SEVERAL_CHUNKS])
def test_observers_see_every_row_once_in_order(chunk_elements, base, base_state, tmp_path):
    experts = [write_expert(base, tmp_path / task, random_deltas(base_state, seed)) for seed, task in enumerate(TASKS)]
    states = [read_state_dict(expert) for expert in experts]
    seen: list[tuple[str, slice, torch.Tensor]] = []
    calls = []
    report = analyze_conflicts(
        load_recipe(recipe(base, experts)),
        quiet=True,
        chunk_elements=chunk_elements,
        observers=[lambda *call: seen.append(call), lambda *call: calls.append(call[:2])],
    )
    assert calls == [(name, rows) for name, rows, _ in seen]  # every observer, each chunk, in turn
    assert list(dict.fromkeys(name for name, _, _ in seen)) == list(base_state)
    for name, tensor in base_state.items():
        chunks = [(rows, vectors) for seen_name, rows, vectors in seen if seen_name == name]
        starts = [rows.start for rows, _ in chunks]
        assert starts == sorted(starts) and starts[0] == 0
        assert [rows.stop for rows, _ in chunks[:-1]] == starts[1:] and chunks[-1][0].stop == tensor.shape[0]
        if tensor.dim() == 1 or chunk_elements == ONE_CHUNK:
            assert len(chunks) == 1
        else:
            assert len(chunks) == -(-tensor.shape[0] // (SEVERAL_CHUNKS // tensor.shape[1]))
        for rows, vectors in chunks:
            expected = torch.stack([state[name][rows].float() - tensor[rows].float() for state in states])
            assert vectors.dtype == torch.float32 and torch.equal(vectors, expected), (name, rows)
    assert sum(vectors[0].numel() for _, _, vectors in seen) == sum(unit.parameters for unit in report.units)


@pytest.mark.parametrize("chunk_elements", [ONE_CHUNK, SEVERAL_CHUNKS])
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_task_vector_with_nan_names_the_tensor_and_the_expert(value, chunk_elements, base, base_state, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    broken = torch.zeros(base_state[name].shape)
    broken[100, 7] = value
    experts = [write_expert(base, tmp_path / "a", {}), write_expert(base, tmp_path / "b", {name: broken})]
    with pytest.raises(MergewiseError, match=f"tensor {name}: the task vector of expert .*/b holds NaN or infinity"):
        analyze(base, experts, chunk_elements)


def test_units_are_summed_separately_and_the_model_as_a_whole(base, base_state, tmp_path):
    deltas = {name: delta for name, delta in random_deltas(base_state).items() if name.startswith("model.layers.")}
    flipped = {name: -delta if name.startswith("model.layers.1.") else delta for name, delta in deltas.items()}
    experts = [write_expert(base, tmp_path / "a", deltas), write_expert(base, tmp_path / "b", flipped)]
    report = analyze(base, experts, SEVERAL_CHUNKS)  # float64 sums over several chunks per tensor
    by_unit = {unit.unit: unit for unit in report.units}
    assert by_unit["layers.0"].cosines[0][1] == pytest.approx(1.0, abs=1e-6)
    assert by_unit["layers.1"].cosines[0][1] == pytest.approx(-1.0, abs=1e-6)
    assert (by_unit["layers.0"].sign_conflict, by_unit["layers.1"].sign_conflict) == pytest.approx((0.0, 1.0))
    same, opposite = (
        sum(
            delta.double().square().sum().item()
            for name, delta in deltas.items()
            if name.startswith(f"model.layers.{layer}.")
        )
        for layer in (0, 1)
    )
    assert report.overall_cosines[0][1] == pytest.approx((same - opposite) / (same + opposite), abs=1e-5)


def test_integer_tensors_are_skipped(base, tmp_path):
    counter = {"model.step_counter": torch.tensor([7], dtype=torch.int64)}
    with_counter = write_expert(base, tmp_path / "base", {}, extra=counter)
    experts = [write_expert(base, tmp_path / task, {}, extra=counter) for task in ("a", "b")]
    assert [unit.unit for unit in analyze(with_counter, experts).units] == UNITS


def test_report_files(tiny_family, tmp_path):
    family = tiny_family("llama")
    report_dir = tmp_path / "report"
    report = analyze_to_folder(load_recipe(recipe(family.base, list(family.fine_tunes))), report_dir, quiet=True)
    assert sorted(path.name for path in report_dir.iterdir()) == [
        "conflict.csv",
        "conflict.json",
        "conflict.png",
        "mergewise.yml",
    ]
    with open(report_dir / "conflict.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["unit", "parameters", "sign_conflict", "cancellation", "cos:a|b", "cos:a|c", "cos:b|c"]
    assert [row[0] for row in rows[1:]] == [unit.unit for unit in report.units] == UNITS
    written = json.loads((report_dir / "conflict.json").read_text())
    assert written == json.loads(json.dumps(report.to_json()))
    assert written["tasks"] == TASKS and written["conflict_density"] == 0.2
    assert (report_dir / "conflict.png").read_bytes().startswith(b"\x89PNG")
    for unit in report.units:  # independent random fine-tunes: some conflict, nothing degenerate
        assert 0.0 < unit.sign_conflict < 1.0 and 0.0 < unit.cancellation < 1.0
        cosines = np.array(unit.cosines)
        assert np.allclose(cosines, cosines.T) and np.allclose(np.diag(cosines), 1.0)


def test_existing_report_dir_is_kept_without_overwrite(base, base_state, tmp_path):
    deltas = random_deltas(base_state)
    experts = [write_expert(base, tmp_path / task, deltas) for task in ("a", "b")]
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "notes.txt").write_text("mine")
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(MergewiseError, match="already exists"):
        analyze_to_folder(load_recipe(recipe(base, experts)), report_dir, quiet=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    assert [path.name for path in report_dir.iterdir()] == ["notes.txt"]
    with pytest.raises(MergewiseError, match="not written by mergewise"):  # --overwrite spares others' folders
        analyze_to_folder(load_recipe(recipe(base, experts)), report_dir, overwrite=True, quiet=True)
    (report_dir / "notes.txt").unlink()
    for _ in range(2):  # an empty folder, then the earlier report
        analyze_to_folder(load_recipe(recipe(base, experts)), report_dir, overwrite=True, quiet=True)
        assert sorted(path.name for path in report_dir.iterdir()) == [
            "conflict.csv",
            "conflict.json",
            "conflict.png",
            "mergewise.yml",
        ]


def test_missing_tensor_names_it_and_writes_nothing(base, tmp_path):
    missing = "model.layers.1.mlp.up_proj.weight"
    experts = [write_expert(base, tmp_path / "a", {}), write_expert(base, tmp_path / "b", {}, drop=(missing,))]
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(MergewiseError, match=f"tensor {missing} is missing in .*b"):
        analyze_to_folder(load_recipe(recipe(base, experts)), tmp_path / "report", quiet=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_cli_resolves_models_beside_the_recipe(base, base_state, tmp_path, capsys):
    shutil.copytree(base, tmp_path / "base")
    for task, seed in (("a", 1), ("b", 2)):
        write_expert(base, tmp_path / task, random_deltas(base_state, seed))
    config = tmp_path / "recipe.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": "base",
                "mediator": {"experts": [{"model": "a", "task": "a"}, {"model": "b", "task": "b"}]},
            }
        )
    )
    assert main(["mediator", "analyze", str(config), str(tmp_path / "report")]) == 0
    assert "5 units analysed" in capsys.readouterr().out
    assert (tmp_path / "report" / "conflict.png").stat().st_size > 0
    assert main(["mediator", "analyze", str(config), str(tmp_path / "report"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
