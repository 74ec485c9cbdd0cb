"""`mergewise mediator analyze`: how much the experts' task vectors τ_t = θ_t − θ₀ conflict, per unit.

- sign conflict d: per expert and tensor keep the top-k share of |τ_t|; over the entries kept by at
  least two experts, the |τ|-weighted share whose kept signs disagree;
- cancellation c = 1 − ‖Σ_t τ_t‖ / Σ_t ‖τ_t‖ (0: aligned, → 1: the updates cancel);
- pairwise cosines of the task vectors, per unit and over the whole model.

Streamed in row chunks (memory: one chunk of each expert, whatever the tensor's size): per tensor,
the cut of each expert's top-k comes from exact histograms of |τ|'s bit patterns over the row chunks,
then a last pass over the chunks accumulates every sum in float64 and feeds the chunk observers.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from mergewise.checkpoint import RECORD_FILE, check_output_location, staged_folder
from mergewise.chunking import CHUNK_ELEMENTS, row_ranges
from mergewise.errors import MergewiseError
from mergewise.mediator.settings import MediatorRecipe
from mergewise.mediator.units import ExpertTensor, expert_tensors, unit_of
from mergewise.methods.sparsify import kept_count


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
        return {
            "tasks": self.tasks,
            "conflict_density": self.conflict_density,
            "overall_cosines": self.overall_cosines,
            "units": [asdict(unit) for unit in self.units],
        }

    def write(self, report_dir: Path) -> None:
        pairs = [(a, b) for a in range(len(self.tasks)) for b in range(a + 1, len(self.tasks))]
        with open(report_dir / "conflict.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "unit",
                    "parameters",
                    "sign_conflict",
                    "cancellation",
                    *(f"cos:{self.tasks[a]}|{self.tasks[b]}" for a, b in pairs),
                ]
            )
            for unit in self.units:
                writer.writerow(
                    [
                        unit.unit,
                        unit.parameters,
                        f"{unit.sign_conflict:.6f}",
                        f"{unit.cancellation:.6f}",
                        *(f"{unit.cosines[a][b]:.6f}" for a, b in pairs),
                    ]
                )
        (report_dir / "conflict.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        self._plot(report_dir / "conflict.png")

    def _plot(self, path: Path) -> None:
        from matplotlib.figure import Figure  # not pyplot: the process's backend stays as it is

        figure = Figure(figsize=(13, 4.8))
        lines, heatmap = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
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


@dataclass
class _Sums:
    """Running float64 sums of one row chunk, one unit or the whole model."""

    tasks: int
    parameters: int = 0
    conflict: float = 0.0
    weight: float = 0.0
    sum_square: float = 0.0  # ‖Σ_t τ_t‖²
    gram: np.ndarray = field(init=False)  # τ_a · τ_b

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.tasks, self.tasks))

    def add(self, other: _Sums) -> None:
        self.parameters += other.parameters
        self.conflict += other.conflict
        self.weight += other.weight
        self.sum_square += other.sum_square
        self.gram += other.gram

    def cosines(self) -> list[list[float]]:
        norms = np.sqrt(np.diag(self.gram))
        scale = np.outer(norms, norms)
        cosines = np.divide(self.gram, scale, out=np.zeros_like(self.gram), where=scale > 0)
        np.fill_diagonal(cosines, 1.0)
        return cosines.round(6).tolist()

    def cancellation(self) -> float:
        total = float(np.sqrt(np.diag(self.gram)).sum())
        return 1.0 - float(np.sqrt(self.sum_square)) / total if total > 0 else 0.0


# A row-chunk observer: (tensor name, its rows, the float32 task vectors [tasks, rows, *rest] there).
ChunkObserver = Callable[[str, slice, torch.Tensor], None]


class TaskVectorChunks:
    """The task vectors τ_t = θ_t − θ₀ of one tensor, float32 [tasks, rows, *rest], one row chunk at a
    time, anew on every iteration: the cut needs passes over the whole tensor, and re-reading the
    rows (from the page cache) keeps memory at one chunk. A tensor of one chunk is read once and kept.
    1-D tensors come whole, as [tasks, n]; a scalar as [tasks]."""

    def __init__(self, job: ExpertTensor, chunk_elements: int = CHUNK_ELEMENTS):
        self.job = job
        self.ranges = row_ranges(job.shape, whole=len(job.shape) < 2, chunk_elements=chunk_elements)
        self._only = self._read(self.ranges[0]) if len(self.ranges) == 1 else None

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._only is not None:
            return iter([self._only])
        return (self._read(rows) for rows in self.ranges)

    def _read(self, rows: slice) -> torch.Tensor:
        base = self.job.base.model.map_rows(self.job.base.name, rows).float()
        vectors = torch.empty((len(self.job.inputs), *base.shape))
        for row, source in zip(vectors, self.job.inputs):
            torch.sub(source.model.map_rows(source.name, rows).float(), base, out=row)
        return vectors


_HALF_BITS = 16
_BUCKETS = 1 << _HALF_BITS


def _magnitude_keys(vectors: torch.Tensor) -> torch.Tensor:
    """|τ| as int32 bit patterns [tasks, entries]: the bits of non-negative floats order as their values."""
    return vectors.abs().reshape(len(vectors), -1).view(torch.int32)


def _counts(positions: torch.Tensor, tasks: int) -> np.ndarray:
    """Histograms [tasks, 2^16] of positions task · 2^16 + bucket (np.bincount: 3× torch's speed)."""
    return np.bincount(positions.reshape(-1).numpy(), minlength=tasks * _BUCKETS).reshape(tasks, _BUCKETS)


def _bucket_of_rank(counts: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per task, the bucket of `counts` (a histogram over ascending buckets) holding the rank-th
    largest entry (rank 1: the largest), and that entry's rank among the bucket's own."""
    at_or_above = counts[:, ::-1].cumsum(1)[:, ::-1]
    bucket = (at_or_above >= rank[:, None]).sum(1) - 1
    tasks = np.arange(len(counts))
    return bucket, rank - (at_or_above[tasks, bucket] - counts[tasks, bucket])


def magnitude_cuts(chunks: Iterable[torch.Tensor], tasks: int, count: int, share: float) -> torch.Tensor:
    """Per task, the smallest |τ| bit pattern the top-`share` selection of a tensor's `count` entries
    keeps: entries tied at the cut are all kept, zeros never (cut ≥ 1).

    Exact, in memory bounded by a chunk: the k-th largest |τ| is found by a histogram of the upper 16
    bits of the float32 bit patterns (one pass over `chunks`), then one of the lower 16 bits of the
    entries in the bucket holding it (a second pass). `chunks` are row chunks [tasks, ...] of the
    task vectors and are iterated twice.
    """
    keep = kept_count(count, share)
    if keep >= count:
        return torch.ones(tasks, dtype=torch.int32)
    offsets = torch.arange(tasks, dtype=torch.int32).unsqueeze(1) << _HALF_BITS
    upper = np.zeros((tasks, _BUCKETS), dtype=np.int64)
    for vectors in chunks:
        upper += _counts((_magnitude_keys(vectors) >> _HALF_BITS).add_(offsets), tasks)
    bucket, rank = _bucket_of_rank(upper, np.full(tasks, keep))
    wanted = torch.from_numpy(bucket).to(torch.int32).unsqueeze(1)
    lower = np.zeros((tasks, _BUCKETS), dtype=np.int64)
    for vectors in chunks:
        keys = _magnitude_keys(vectors)
        task, entry = ((keys >> _HALF_BITS) == wanted).nonzero(as_tuple=True)
        lower += _counts((keys[task, entry] & (_BUCKETS - 1)) | offsets[task, 0], tasks)
    low, _ = _bucket_of_rank(lower, rank)
    return torch.from_numpy((bucket << _HALF_BITS) | low).clamp(min=1).to(torch.int32)


def kept_entries(vectors: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Which entries [tasks, entries] of a row chunk the selection behind `cuts` keeps."""
    return _magnitude_keys(vectors) >= cuts.unsqueeze(1)


def chunk_sums(vectors: torch.Tensor, cuts: torch.Tensor) -> _Sums:
    """The float64 sums of one row chunk of task vectors [tasks, ...], given the tensor's cuts."""
    flat = vectors.reshape(len(vectors), -1)
    sums = _Sums(len(vectors), parameters=flat.shape[1])
    kept = kept_entries(flat, cuts)
    shared = kept.sum(0) >= 2
    if shared.any():
        kept, values = kept[:, shared], flat[:, shared]
        disagree = (kept & (values > 0)).any(0) & (kept & (values < 0)).any(0)
        weights = torch.where(kept, values.abs(), 0).double().sum(0)
        sums.conflict, sums.weight = float(weights[disagree].sum()), float(weights.sum())
    wide = flat.double()
    sums.gram = (wide @ wide.T).numpy()
    sums.sum_square = float(wide.sum(0).square().sum())
    return sums


def analyze_conflicts(
    recipe: MediatorRecipe,
    *,
    quiet: bool = False,
    observers: Sequence[ChunkObserver] = (),
    chunk_elements: int = CHUNK_ELEMENTS,
    language: set[str] | None = None,
) -> ConflictReport:
    """The conflict report of the recipe's experts, in memory bounded by one row chunk per expert.

    Each observer is called as `observer(name, rows, task_vectors)` once per row chunk of every
    floating tensor, in tensor order then row order, so that every row is seen exactly once;
    `task_vectors` is float32 [tasks, rows, *rest] (1-D tensors: one chunk [tasks, n]) and is not
    used by the analysis afterwards. Only the language model's tensors are analysed (`language`, found
    from the base when not given): a vision tower is merged, never routed.
    """
    from mergewise.structure import language_model_tensors

    plan = expert_tensors(recipe)
    tasks = recipe.settings.tasks
    share = recipe.settings.conflict_density
    units: dict[str, tuple[_Sums, list[str]]] = {}
    overall = _Sums(len(tasks))
    language = language if language is not None else language_model_tensors(plan.models[0])
    jobs = [job for job in plan.jobs if job.out_dtype.is_floating_point and job.name in language]
    try:
        with tqdm(
            total=sum(math.prod(job.shape) for job in jobs),
            unit="param",
            unit_scale=True,
            desc="conflict analysis",
            disable=quiet,
        ) as progress:
            for job in jobs:
                unit_sums, names = units.setdefault(unit_of(job.name), (_Sums(len(tasks)), []))
                names.append(job.name)
                chunks = TaskVectorChunks(job, chunk_elements)
                cuts = magnitude_cuts(chunks, len(tasks), math.prod(job.shape), share)
                for rows, vectors in zip(chunks.ranges, chunks):
                    sums = chunk_sums(vectors, cuts)
                    _check_finite(sums, job)
                    unit_sums.add(sums)
                    overall.add(sums)
                    for observer in observers:
                        observer(job.name, rows, vectors)
                    progress.update(sums.parameters)
    finally:
        for model in plan.models:
            model.close()
    return ConflictReport(
        tasks=tasks,
        units=[
            UnitConflict(
                unit,
                sums.parameters,
                sums.conflict / sums.weight if sums.weight > 0 else 0.0,
                sums.cancellation(),
                sums.cosines(),
                names,
            )
            for unit, (sums, names) in units.items()
        ],
        overall_cosines=overall.cosines(),
        conflict_density=share,
    )


def _check_finite(sums: _Sums, job: ExpertTensor) -> None:
    """‖τ_t‖² of finite float32 entries cannot overflow float64: a non-finite one means NaN or infinity."""
    for task, square in enumerate(np.diag(sums.gram)):
        if not math.isfinite(square):
            raise MergewiseError(
                f"tensor {job.name}: the task vector of expert {job.inputs[task].model.path} "
                f"holds NaN or infinity; the conflict analysis needs finite weights"
            )


def analyze_to_folder(
    recipe: MediatorRecipe, report_dir: str | Path, *, overwrite: bool = False, quiet: bool = False
) -> ConflictReport:
    """Analyse, then write conflict.csv/.json/.png to a staged `report_dir` (nothing on error)."""
    report_dir = Path(report_dir).expanduser().resolve()
    inputs = [folder for model in expert_tensors(recipe).models for folder in model.folders]
    check_output_location(report_dir, inputs, overwrite)
    report = analyze_conflicts(recipe, quiet=quiet)
    with staged_folder(report_dir, overwrite) as staging:
        report.write(staging)
        (staging / RECORD_FILE).write_text(
            yaml.safe_dump({"conflict_analysis": recipe.settings.model_dump(mode="json")}, sort_keys=False)
        )
    return report
