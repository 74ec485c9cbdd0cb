"""`mergewise mediator analyze`: how much the experts' task vectors τ_t = θ_t − θ₀ conflict, per unit.

- sign conflict d: per expert and tensor keep the top-k share of |τ_t|; over the entries kept by at
  least two experts, the |τ|-weighted share whose kept signs disagree;
- cancellation c = 1 − ‖Σ_t τ_t‖ / Σ_t ‖τ_t‖ (0: aligned, → 1: the updates cancel);
- pairwise cosines of the task vectors, per unit and over the whole model.

Streamed: one tensor of each expert at a time; every sum is accumulated in float64.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from mergewise.checkpoint import RECORD_FILE, check_output_location, staged_folder
from mergewise.engine import CHUNK_ELEMENTS
from mergewise.mediator.settings import MediatorRecipe
from mergewise.methods.sparsify import kept_count
from mergewise.mediator.units import expert_tensors, unit_of


@dataclass
class UnitConflict:
    unit: str
    parameters: int
    sign_conflict: float
    cancellation: float
    cosines: list[list[float]]
    tensors: list[str]


@dataclass
class ConflictReport:
    tasks: list[str]
    units: list[UnitConflict]
    overall_cosines: list[list[float]]
    conflict_density: float

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "conflict_density": self.conflict_density,
                "overall_cosines": self.overall_cosines, "units": [asdict(unit) for unit in self.units]}

    def write(self, report_dir: Path) -> None:
        pairs = [(a, b) for a in range(len(self.tasks)) for b in range(a + 1, len(self.tasks))]
        with open(report_dir / "conflict.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["unit", "parameters", "sign_conflict", "cancellation",
                             *(f"cos:{self.tasks[a]}|{self.tasks[b]}" for a, b in pairs)])
            for unit in self.units:
                writer.writerow([unit.unit, unit.parameters, f"{unit.sign_conflict:.6f}", f"{unit.cancellation:.6f}",
                                 *(f"{unit.cosines[a][b]:.6f}" for a, b in pairs)])
        (report_dir / "conflict.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        self._plot(report_dir / "conflict.png")

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (lines, heatmap) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
        positions = range(len(self.units))
        lines.plot(positions, [unit.sign_conflict for unit in self.units], marker="o", label="sign conflict d")
        lines.plot(positions, [unit.cancellation for unit in self.units], marker="s", label="cancellation c")
        lines.set_xticks(list(positions))
        lines.set_xticklabels([unit.unit for unit in self.units], rotation=60, ha="right", fontsize=7)
        lines.set_ylabel("conflict (0 = none)")
        lines.set_title("conflict per unit")
        lines.legend()
        matrix = np.array(self.overall_cosines)
        image = heatmap.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
        heatmap.set_xticks(range(len(self.tasks)), self.tasks, rotation=45, ha="right")
        heatmap.set_yticks(range(len(self.tasks)), self.tasks)
        for (row, column), value in np.ndenumerate(matrix):
            heatmap.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
        heatmap.set_title("cosine of task vectors (whole model)")
        figure.colorbar(image, ax=heatmap, fraction=0.046)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


@dataclass
class _Sums:
    """Running float64 sums of one unit (or of the whole model)."""

    tasks: int
    parameters: int = 0
    conflict: float = 0.0
    weight: float = 0.0
    sum_square: float = 0.0  # ‖Σ_t τ_t‖²
    gram: np.ndarray = field(init=False)  # τ_a · τ_b

    def __post_init__(self):
        self.gram = np.zeros((self.tasks, self.tasks))

    def cosines(self) -> list[list[float]]:
        norms = np.sqrt(np.diag(self.gram))
        scale = np.outer(norms, norms)
        cosines = np.divide(self.gram, scale, out=np.zeros_like(self.gram), where=scale > 0)
        np.fill_diagonal(cosines, 1.0)
        return cosines.round(6).tolist()

    def cancellation(self) -> float:
        total = float(np.sqrt(np.diag(self.gram)).sum())
        return 1.0 - float(np.sqrt(self.sum_square)) / total if total > 0 else 0.0


def kept_mask(magnitudes: np.ndarray, share: float) -> np.ndarray:
    """The top-`share` entries by magnitude (entries tied at the cut are all kept)."""
    keep = kept_count(magnitudes.size, share)
    if keep >= magnitudes.size:
        return magnitudes > 0
    threshold = np.partition(magnitudes, magnitudes.size - keep)[magnitudes.size - keep]
    return (magnitudes >= threshold) & (magnitudes > 0)


def accumulate(sums: list[_Sums], vectors: np.ndarray, share: float) -> None:
    """Add one tensor's task vectors (tasks × entries, float32) to every running sum in `sums`."""
    magnitudes = np.abs(vectors)
    kept = np.stack([kept_mask(row, share) for row in magnitudes])
    shared = kept.sum(0) >= 2
    if shared.any():
        signs = np.where(kept[:, shared], np.sign(vectors[:, shared]), 0)
        disagree = (signs > 0).any(0) & (signs < 0).any(0)
        weights = np.where(kept[:, shared], magnitudes[:, shared], 0).sum(0, dtype=np.float64)
        conflict, weight = float(weights[disagree].sum()), float(weights.sum())
    else:
        conflict = weight = 0.0
    gram, sum_square = np.zeros((len(vectors), len(vectors))), 0.0
    for start in range(0, vectors.shape[1], CHUNK_ELEMENTS):  # float64 a chunk at a time, not a whole copy
        chunk = vectors[:, start:start + CHUNK_ELEMENTS].astype(np.float64)
        gram += chunk @ chunk.T
        sum_square += float(np.square(chunk.sum(0)).sum())
    for target in sums:
        target.parameters += vectors.shape[1]
        target.conflict += conflict
        target.weight += weight
        target.sum_square += sum_square
        target.gram += gram


def analyze_conflicts(recipe: MediatorRecipe, *, quiet: bool = False) -> ConflictReport:
    plan = expert_tensors(recipe)
    tasks = recipe.settings.tasks
    share = recipe.settings.conflict_density
    units: dict[str, tuple[_Sums, list[str]]] = {}
    overall = _Sums(len(tasks))
    jobs = [job for job in plan.jobs if job.out_dtype.is_floating_point]
    try:
        with tqdm(total=sum(int(np.prod(job.shape)) for job in jobs), unit="param", unit_scale=True,
                  desc="conflict analysis", disable=quiet) as progress:
            for job in jobs:
                base = job.base.model.read(job.base.name).float().reshape(-1)
                vectors = torch.stack([source.model.read(source.name).float().reshape(-1) - base
                                       for source in job.inputs]).numpy()
                unit_sums, names = units.setdefault(unit_of(job.name), (_Sums(len(tasks)), []))
                names.append(job.name)
                accumulate([unit_sums, overall], vectors, share)
                progress.update(vectors.shape[1])
    finally:
        for model in plan.models:
            model.close()
    return ConflictReport(
        tasks=tasks,
        units=[UnitConflict(unit, sums.parameters, sums.conflict / sums.weight if sums.weight > 0 else 0.0,
                            sums.cancellation(), sums.cosines(), names)
               for unit, (sums, names) in units.items()],
        overall_cosines=overall.cosines(),
        conflict_density=share,
    )


def analyze_to_folder(recipe: MediatorRecipe, report_dir: str | Path, *, overwrite: bool = False,
                      quiet: bool = False) -> ConflictReport:
    """Analyse, then write conflict.csv/.json/.png to a staged `report_dir` (nothing on error)."""
    report_dir = Path(report_dir).expanduser().resolve()
    inputs = [model.path for model in expert_tensors(recipe).models]
    check_output_location(report_dir, inputs, overwrite)
    report = analyze_conflicts(recipe, quiet=quiet)
    with staged_folder(report_dir, overwrite) as staging:
        report.write(staging)
        (staging / RECORD_FILE).write_text(yaml.safe_dump({"conflict_analysis": recipe.settings.model_dump(mode="json")},
                                                          sort_keys=False))
    return report
