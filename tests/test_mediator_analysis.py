"""Conflict analysis on experts whose task vectors are set exactly, so every measure is known."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mergewise.cli import main
from mergewise.errors import MergewiseError
from mergewise.mediator.analysis import accumulate, analyze_conflicts, kept_mask
from mergewise.mediator.analysis import _Sums as Sums
from mergewise.mediator.settings import load_recipe
from mergewise.tiny_models import build_tiny_model, read_state_dict


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("analysis") / "base", dtype=torch.float32)


def expert(base: Path, folder: Path, task_vector) -> Path:
    """A copy of `base` with θ = θ₀ + task_vector(name, θ₀) for every tensor."""
    folder.mkdir(parents=True)
    for file in base.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy2(file, folder / file.name)
    state = {name: (tensor + task_vector(name, tensor)).contiguous() for name, tensor in read_state_dict(base).items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def vector(seed: int):
    return lambda name, tensor: 0.01 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(
        seed * 1000 + sum(map(ord, name))))


def recipe(base: Path, experts: list[Path], **mediator) -> dict:
    return {"merge_method": "linear", "base_model": str(base),
            "mediator": {"experts": [{"model": str(path), "task": f"t{index}"} for index, path in enumerate(experts)],
                         **mediator}}


def analyze(base, experts, **mediator):
    return analyze_conflicts(load_recipe(recipe(base, experts, **mediator)), quiet=True)


def test_identical_updates_do_not_conflict(base, tmp_path):
    first = expert(base, tmp_path / "a", vector(1))
    second = expert(base, tmp_path / "b", vector(1))
    report = analyze(base, [first, second])
    assert {unit.unit for unit in report.units} >= {"model.embed_tokens", "layers.0", "layers.1", "model.norm"}
    for unit in report.units:
        assert unit.sign_conflict == 0.0 and unit.cancellation == pytest.approx(0.0, abs=1e-6)
        assert unit.cosines == [[1.0, 1.0], [1.0, 1.0]]
    assert sum(unit.parameters for unit in report.units) == sum(t.numel() for t in read_state_dict(base).values())


def test_opposite_updates_cancel(base, tmp_path):
    first = expert(base, tmp_path / "a", vector(1))
    second = expert(base, tmp_path / "b", lambda name, tensor: -vector(1)(name, tensor))
    report = analyze(base, [first, second])
    for unit in report.units:
        assert unit.sign_conflict == pytest.approx(1.0)
        assert unit.cancellation == pytest.approx(1.0, abs=1e-5)
        assert unit.cosines[0][1] == pytest.approx(-1.0, abs=1e-5)
    assert report.overall_cosines[0][1] == pytest.approx(-1.0, abs=1e-5)


def test_orthogonal_updates(base, tmp_path):
    """Disjoint supports: cosine 0, nothing kept by two experts, c = 1 − √2/2 for equal norms."""
    def half(which: int):
        def task_vector(name, tensor):
            values = torch.zeros(tensor.numel())
            values[which::2] = 0.01
            return values.reshape(tensor.shape)
        return task_vector

    report = analyze(base, [expert(base, tmp_path / "a", half(0)), expert(base, tmp_path / "b", half(1))])
    for unit in report.units:
        assert unit.cosines[0][1] == pytest.approx(0.0, abs=1e-6)
        assert unit.sign_conflict == 0.0
    layer = next(unit for unit in report.units if unit.unit == "layers.0")
    assert layer.cancellation == pytest.approx(1 - math.sqrt(2) / 2, abs=1e-3)


def test_sign_conflict_by_hand():
    """Three experts, six entries, top half kept per expert."""
    vectors = np.array([[4.0, -3.0, 2.0, 0.1, 0.1, 0.1],
                        [5.0, 3.0, -0.1, 0.1, 0.1, 6.0],
                        [-0.5, 0.2, 0.2, 3.0, 2.0, 1.0]], dtype=np.float32)
    assert kept_mask(np.abs(vectors[0]), 0.5).tolist() == [True, True, True, False, False, False]
    sums = Sums(3)
    accumulate([sums], vectors, 0.5)
    # kept: e0 {0,1,2}, e1 {0,1,5}, e2 {3,4,5}; shared entries: 0 (e0,e1 agree: 9), 1 (e0,e1 disagree: 6),
    # 5 (e1,e2 agree: 7). A tie at the cut keeps every tied entry:
    assert kept_mask(np.array([1.0, 0.2, 3.0, 1.0]), 0.5).tolist() == [True, False, True, True]
    assert sums.conflict / sums.weight == pytest.approx(6 / 22)
    assert sums.parameters == 6


def test_report_files_and_cli(base, tmp_path, capsys):
    experts = [expert(base, tmp_path / name, vector(seed)) for seed, name in enumerate(["a", "b", "c"], start=1)]
    config = tmp_path / "mediator.yml"
    config.write_text(json.dumps(recipe(base, experts)))  # JSON is YAML
    report_dir = tmp_path / "report"
    assert main(["mediator", "analyze", str(config), str(report_dir), "--quiet"]) == 0
    rows = list(csv.DictReader(open(report_dir / "conflict.csv")))
    report = json.loads((report_dir / "conflict.json").read_text())
    assert len(rows) == len(report["units"]) >= 3
    assert set(rows[0]) == {"unit", "parameters", "sign_conflict", "cancellation", "cos:t0|t1", "cos:t0|t2", "cos:t1|t2"}
    assert all(0.3 < float(row["sign_conflict"]) < 0.7 for row in rows)  # independent random signs
    assert (report_dir / "conflict.png").stat().st_size > 10_000
    # an existing report folder is kept unless --overwrite
    assert main(["mediator", "analyze", str(config), str(report_dir), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_missing_tensor_is_named(base, tmp_path):
    broken = expert(base, tmp_path / "broken", vector(1))
    state = read_state_dict(broken)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergewiseError, match="model.layers.1.mlp.down_proj.weight is missing"):
        analyze(base, [expert(base, tmp_path / "fine", vector(2)), broken])
