"""The task-arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

All are one computation — sparsify each task vector (input − base), weight it, optionally keep only
entries agreeing with the majority sign (TIES consensus), sum, optionally normalise by the weights
that contributed, scale by lambda, add to the base — with a different sparsifier and defaults.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from mergewise.methods.base import BasePolicy, ChunkedTensors, MergeMethod, PerModel, TensorRows, WorkingMemory
from mergewise.methods.kernel_loading import bf16_kernels
from mergewise.methods.sparsify import (
    KeepBits,
    SelectionScratch,
    Sparsification,
    l1_rescale,
    random_mask,
    rank_random_mask,
    select_magnitudes,
)

# Sparsifications whose masks `prepare` draws for the whole tensor, as bits the merge reads.
SELECTED_IN_PREPARE = (Sparsification.MAGNITUDE, Sparsification.MAGNITUDE_OUTLIERS, Sparsification.RANK_RANDOM)

# Merged parameters from which loading the fused kernels (~0.7 s) pays off. Measured per 0.2 B
# parameters on 2 cores: plain weighted sums are memory-bound, 0.65 s eager against 0.58 s fused;
# magnitude selection and sign consensus take 5.5 s eager against 1.3 s fused.
PLAIN_FUSED_MIN_PARAMETERS = 2_000_000_000
SELECTING_FUSED_MIN_PARAMETERS = 50_000_000

# Measured working memory by sparsification (benchmarks/memory_estimate.py). A magnitude selection
# keeps, for each of its two workers, 2-byte keys and 4-byte positions for the largest tensor; a
# DELLA draw its masks; DARE draws its masks per row chunk. The selecting ones load the fused kernels.
WORKING_MEMORY = {
    None: WorkingMemory(),
    Sparsification.MAGNITUDE: WorkingMemory(190, 12.5),
    Sparsification.MAGNITUDE_OUTLIERS: WorkingMemory(190, 12.5),
    Sparsification.RANDOM: WorkingMemory(250, 0.5),
    Sparsification.RANK_RANDOM: WorkingMemory(290, 8.5),
}


@dataclass(frozen=True)
class SparsifyStats:
    """Whole-tensor figures per input model: the selection (magnitude or DELLA draw) and the L1 rescale factor."""

    keeps: Sequence[KeepBits | Future | None] | None  # per input (a future while it is selected); None: all
    scales: Sequence[float | Future]  # per input (a future while it is drawn)

    def scale(self, index: int) -> float:
        scale = self.scales[index]
        return scale.result() if isinstance(scale, Future) else scale


def _selected_rows(rows: TensorRows, index: int) -> torch.Tensor | None:
    """Input `index`'s selection (drawn, for DELLA) over these rows, as bools shaped like them (None: all)."""
    keep = _selection(rows, index)
    return None if keep is None else keep.rows_like(rows.first_row, rows.inputs[index])


def _selection(rows: TensorRows, index: int) -> KeepBits | None:
    keep = rows.stats.keeps[index]
    return keep.result() if isinstance(keep, Future) else keep


def _keep_mask(
    rows: TensorRows,
    index: int,
    delta: torch.Tensor,
    sparsification: Sparsification | None,
    density: float,
) -> torch.Tensor | None:
    """Which entries of input `index`'s delta survive in these rows (None = all): a selection made in
    `prepare`, or DARE's draw for these rows."""
    if sparsification is None or density >= 1:
        return None
    if sparsification in SELECTED_IN_PREPARE:
        return _selected_rows(rows, index)
    assert rows.rng is not None  # the engine seeds the rows of every method that uses randomness
    return random_mask(delta, density, rows.rng(index))


def prepare_task_arithmetic(
    tensors: ChunkedTensors,
    *,
    sparsification: Sparsification | None,
    density: PerModel,
    rescale: bool,
    gamma: PerModel = (),
    epsilon: PerModel = (),
) -> SparsifyStats | None:
    """Magnitude selections need the whole |delta|; an L1 rescale needs whole-tensor sums of the masks."""
    if sparsification is None:
        return None
    count = len(density)
    gamma = gamma or (0.0,) * count
    epsilon = epsilon or (0.0,) * count
    keeps = None
    if sparsification in SELECTED_IN_PREPARE:
        selections = tensors.workspace.setdefault("selections", _Selections())
        if sparsification is Sparsification.RANK_RANDOM:
            return SparsifyStats(*selections.rank_random_draws(tensors, density, epsilon, rescale))
        gammas = gamma if sparsification is Sparsification.MAGNITUDE_OUTLIERS else (None,) * count
        keeps = selections.magnitude_keeps(tensors, density, gammas)
    scales = [1.0] * count
    if rescale:
        stats = SparsifyStats(keeps, scales)
        totals = [0.0] * count
        kept = [0.0] * count
        for rows in tensors.chunks():
            assert rows.base is not None  # BasePolicy.REQUIRED
            rows.stats = stats
            for index, tensor in enumerate(rows.inputs):
                delta = tensor - rows.base
                mask = _keep_mask(rows, index, delta, sparsification, density[index])
                whole, masked = _l1_norms(delta, mask)
                totals[index] += whole
                kept[index] += masked
        assert rows.base is not None
        scales = [_l1_scale(total, part, rows.base.dtype) for total, part in zip(totals, kept)]
    return SparsifyStats(keeps, scales)


def _l1_norms(delta: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
    """A row chunk's L1 norms of a delta, whole and masked."""
    magnitude = delta.abs()
    whole = float(magnitude.sum(dtype=torch.float64))
    return whole, (whole if mask is None else float((magnitude * mask).sum(dtype=torch.float64)))


def _l1_scale(total: float, kept: float, dtype: torch.dtype) -> float:
    return l1_rescale(_rounded(total, dtype), _rounded(kept, dtype))


class _Selections:
    """The whole-tensor selections of one merge, kept in its workspace (closed when the merge ends):
    two worker threads (the selection kernels are single-threaded) select model by model, a
    magnitude selection in a scratch memory of its own, queued as the tensors' statistics are asked
    for, so a tensor's selections may still run while the next tensor is read; the merge waits for
    them only where it needs them. Fresh memory and fresh threads per tensor cost more than
    selecting on a 0.2 B-parameter model, so both are kept from tensor to tensor."""

    WORKERS = 2

    def __init__(self) -> None:
        self.scratches: queue.SimpleQueue[SelectionScratch] = queue.SimpleQueue()
        for _ in range(self.WORKERS):
            self.scratches.put(SelectionScratch())
        self.workers = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="mergewise-select")

    def magnitude_keeps(
        self, tensors: ChunkedTensors, density: PerModel, gammas: Sequence[float | None]
    ) -> list[Future]:
        """Each input's magnitude selection, as a future of its `KeepBits` (or None: every entry kept)."""
        return [
            self.workers.submit(self._magnitude, tensors, index, share, gamma)
            for index, (share, gamma) in enumerate(zip(density, gammas))
        ]

    def rank_random_draws(
        self, tensors: ChunkedTensors, density: PerModel, epsilon: PerModel, rescale: bool
    ) -> tuple[list[Future], list[Future]]:
        """Each input's DELLA draw, drawn once for the whole tensor (the rescale and the merge read
        the same bits, and the merge can take the fused kernels): futures of its `KeepBits` (None:
        every entry kept) and of its L1 rescale factor (1 without `rescale`)."""
        for share, spread in zip(density, epsilon):
            if share < 1 and not (0 < share - spread and share + spread < 1):
                raise ValueError(f"della needs 0 < density ± epsilon < 1 (density {share}, epsilon {spread})")
        keeps: list[Future] = [Future() for _ in density]
        scales: list[Future] = [Future() for _ in density]
        for index, (share, spread) in enumerate(zip(density, epsilon)):
            self.workers.submit(self._rank_random, tensors, index, share, spread, rescale, keeps[index], scales[index])
        return keeps, scales

    def _magnitude(self, tensors: ChunkedTensors, index: int, density: float, gamma: float | None) -> KeepBits | None:
        scratch = self.scratches.get()  # one per worker: never waits
        try:
            return select_magnitudes(input_and_base(tensors, index), tensors.numel, density, gamma, scratch)
        finally:
            self.scratches.put(scratch)

    @staticmethod
    def _rank_random(
        tensors: ChunkedTensors,
        index: int,
        density: float,
        epsilon: float,
        rescale: bool,
        keep: Future,
        scale: Future,
    ) -> None:
        try:
            masks = []
            total = kept = 0.0
            for rows in tensors.chunks(models=[index]):
                assert rows.base is not None and rows.rng is not None  # REQUIRED base; seeded rows
                delta = rows.inputs[0] - rows.base
                mask = None if density >= 1 else rank_random_mask(delta, density, epsilon, rows.rng(index))
                if rescale:
                    whole, masked = _l1_norms(delta, mask)
                    total, kept = total + whole, kept + masked
                if mask is not None:
                    masks.append(mask.reshape(-1).cpu())
            keep.set_result(KeepBits.of_mask(torch.cat(masks)) if masks else None)
            scale.set_result(_l1_scale(total, kept, delta.dtype) if rescale else 1.0)
        except BaseException as error:  # both wait for this draw: both report its failure
            for future in (keep, scale):
                if not future.done():
                    future.set_exception(error)

    def close(self) -> None:
        self.workers.shutdown()


def input_and_base(tensors: ChunkedTensors, index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Input `index` and the base, row chunk by row chunk (read only when iterated)."""
    for rows in tensors.chunks(models=[index]):
        assert rows.base is not None  # BasePolicy.REQUIRED
        yield rows.inputs[0], rows.base


def _rounded(value: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(value, dtype=dtype))


def merge_task_arithmetic(
    rows: TensorRows,
    *,
    sparsification: Sparsification | None,
    consensus: bool,
    weight: PerModel,
    density: PerModel = (),
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    gamma: PerModel = (),
    epsilon: PerModel = (),
) -> torch.Tensor:
    """base + lambda · combine(weight_i · sparsify(input_i − base)).

    `int8_mask` is accepted for config compatibility: it only chose a mask dtype to save memory, and
    masks here are booleans on row chunks already. `gamma` and `epsilon` shape the selections that
    `prepare` makes; they are named here because this signature is the method's schema.
    """
    base = rows.base
    assert base is not None  # BasePolicy.REQUIRED
    # Weights and rescale factors are tensors of the working dtype so each step rounds as mergekit's.
    weights = torch.tensor(weight, dtype=base.dtype, device=base.device)
    parts = _weighted_deltas(rows, weights, sparsification, density, reuse_memory=not consensus)
    if consensus:
        weighted = list(parts)
        agrees = majority_sign_agreement(weighted)
        combined = sum_over_models(part.mul_(agree) for part, agree in zip(weighted, agrees))
        divisor = sum_over_models(weights[index] * agree for index, agree in enumerate(agrees))
        divisor = torch.where(divisor == 0, 1, divisor)
    else:
        combined = sum_over_models(parts)
        divisor = _total_weight(weights)
    if normalize:
        combined.div_(divisor)
    if lambda_ != 1:
        combined.mul_(lambda_)
    return combined.add_(base)


def _weighted_deltas(
    rows: TensorRows,
    weights: torch.Tensor,
    sparsification: Sparsification | None,
    density: PerModel,
    *,
    reuse_memory: bool,
) -> Iterator[torch.Tensor]:
    """weight_i · sparsify(input_i − base), model by model. Each step updates the temporary in place
    (the same roundings as out-of-place operations, with less memory traffic); with `reuse_memory`
    each model's part is computed into the previous one's memory, so it must be used up before the
    next is asked for."""
    base = rows.base
    assert base is not None  # BasePolicy.REQUIRED
    count = len(rows.inputs)
    density = density or (1.0,) * count
    previous = None
    for index, tensor in enumerate(rows.inputs):
        delta = torch.sub(tensor, base, out=previous) if previous is not None else tensor - base
        mask = _keep_mask(rows, index, delta, sparsification, density[index])
        if mask is not None:
            delta.mul_(mask)
        if rows.stats is not None and rows.stats.scale(index) != 1.0:
            delta.mul_(torch.tensor(rows.stats.scale(index), dtype=base.dtype))
        yield delta.mul_(weights[index])
        previous = delta if reuse_memory else None


def sum_over_models(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ of the models' parts, accumulated in model order in at least float32 and rounded once; a new
    tensor.

    For bf16 and float16 this is `torch.stack(parts).sum(dim=0)` bit for bit (up to 16 parts),
    at a third of its cost: torch's reduction over a short leading dimension is far slower than
    element-wise passes. Like it, the sum starts from +0, so negative zeros alone sum to +0.
    """
    parts = iter(parts)
    first = next(parts)
    dtype = first.dtype
    total = first.to(torch.promote_types(dtype, torch.float32), copy=True).add_(0.0)
    for part in parts:
        total.add_(part)  # promoted to the accumulator's dtype, exactly
    return total.to(dtype)


def majority_sign_agreement(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """TIES's sign election: per part, where its sign is that of Σ parts (a zero sum counts as
    positive; zero entries agree with neither sign)."""
    majority_positive = sum_over_models(parts) >= 0
    return [torch.where(majority_positive, part > 0, part < 0) for part in parts]


def _total_weight(weights: torch.Tensor) -> torch.Tensor:
    """The normaliser without sign consensus: Σ weight, or 1 where that is ~0."""
    total = weights.sum()
    return torch.where(total.abs() < 1e-8, 1, total)


def fused_task_arithmetic(
    rows: TensorRows,
    *,
    sparsification: Sparsification | None,
    consensus: bool,
    weight: PerModel,
    density: PerModel = (),
    normalize: bool = False,
    lambda_: float = 1.0,
    **unused: Any,
) -> torch.Tensor | None:
    """`merge_task_arithmetic` in one pass over bf16 CPU rows, bit for bit; None for rows it does not
    take (other dtypes or devices, DARE's per-chunk masks) and while the kernels are still loading."""
    if rows.base is None or not (sparsification is None or sparsification in SELECTED_IN_PREPARE):
        return None
    kernels = bf16_kernels()
    if kernels is None or not kernels.supports([rows.base, *rows.inputs]):
        return None
    count = len(rows.inputs)
    density = density or (1.0,) * count
    selections = [
        None if sparsification is None or density[index] >= 1 else _selection(rows, index) for index in range(count)
    ]
    masks = [
        None if keep is None else keep.packed_rows(rows.first_row, rows.inputs[index])
        for index, keep in enumerate(selections)
    ]
    weights = torch.tensor(weight, dtype=torch.bfloat16)
    merged, rows.non_finite = kernels.task_arithmetic(
        rows.base,
        rows.inputs,
        weights=list(weight),
        masks=masks,
        scales=[rows.stats.scale(index) for index in range(count)] if rows.stats is not None else [1.0] * count,
        consensus=consensus,
        normalize=normalize,
        divisor=float(_total_weight(weights)),
        lambda_=lambda_,
    )
    return merged


def _preset(
    name: str, sparsification: Sparsification | None, consensus: bool, normalize: bool, rescale: bool, description: str
) -> MergeMethod:
    unused: dict[str, PerModel] = {}  # an empty PerModel: not given
    if sparsification is not Sparsification.MAGNITUDE_OUTLIERS:
        unused["gamma"] = ()
    if sparsification is not Sparsification.RANK_RANDOM:
        unused["epsilon"] = ()
    defaults = {"normalize": normalize, "rescale": rescale, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}
    return MergeMethod(
        name=name,
        merge_rows=merge_task_arithmetic,
        fused=fused_task_arithmetic,
        fused_min_parameters=(
            PLAIN_FUSED_MIN_PARAMETERS if sparsification is None and not consensus else SELECTING_FUSED_MIN_PARAMETERS
        ),
        load_fused=bf16_kernels,
        prepare=prepare_task_arithmetic,
        base=BasePolicy.REQUIRED,
        base_alone_is_base=True,
        fixed={"sparsification": sparsification, "consensus": consensus, **unused},
        defaults=defaults,
        uses_randomness=sparsification in (Sparsification.RANDOM, Sparsification.RANK_RANDOM),
        working_memory=WORKING_MEMORY[sparsification],
        description=description,
    )


TASK_ARITHMETIC_METHODS = (
    _preset("task_arithmetic", None, False, False, False, "base + Σ weight·(model − base)"),
    _preset(
        "ties",
        Sparsification.MAGNITUDE,
        True,
        True,
        False,
        "top-density magnitudes per task vector, majority sign, disjoint mean",
    ),
    _preset(
        "dare_linear",
        Sparsification.RANDOM,
        False,
        False,
        True,
        "random drop (keep = density) with L1 rescale, then task arithmetic",
    ),
    _preset(
        "dare_ties", Sparsification.RANDOM, True, False, True, "random drop with L1 rescale, then TIES sign consensus"
    ),
    _preset(
        "breadcrumbs",
        Sparsification.MAGNITUDE_OUTLIERS,
        False,
        False,
        False,
        "drop the gamma largest and the smallest magnitudes, then task arithmetic",
    ),
    _preset(
        "breadcrumbs_ties",
        Sparsification.MAGNITUDE_OUTLIERS,
        True,
        False,
        False,
        "breadcrumbs sparsification with TIES sign consensus",
    ),
    _preset(
        "della",
        Sparsification.RANK_RANDOM,
        True,
        True,
        True,
        "magnitude-rank-dependent random drop (MagPrune), rescale, TIES consensus",
    ),
    _preset(
        "della_linear",
        Sparsification.RANK_RANDOM,
        False,
        False,
        True,
        "MagPrune random drop with rescale, then task arithmetic",
    ),
)
