"""Merge methods as pure functions of tensor rows, checked on small hand-computed float32 tensors.

Each test calls the registry directly, the way the engine does: parameters are completed with the
schema's defaults, `prepare` (when the method has one) reads the whole tensor chunk by chunk, and
`merge` runs on row chunks with those whole-tensor statistics.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergewise.errors import MergewiseError
from mergewise.methods import METHODS, BasePolicy, get_method, merge_tensors
from mergewise.methods.base import REQUIRED
from mergewise.methods.sparsify import magnitude_positions, select_magnitudes

SQRT_HALF = math.sqrt(0.5)


# ------------------------------------------------------------------------------------------ helpers
def tensor(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def run_method(
    name: str,
    base: torch.Tensor | None,
    inputs: list[torch.Tensor],
    *,
    chunk_rows: int | None = None,
    seed: int = 0,
    **given,
) -> torch.Tensor:
    """Merge whole tensors as the engine does (`prepare` + `merge`), in row chunks of `chunk_rows`
    (default: one chunk)."""
    reference = inputs[0]
    row_elements = math.prod(reference.shape[1:]) if reference.dim() else 1
    chunk_elements = row_elements * chunk_rows if chunk_rows else max(reference.numel(), 1)
    return merge_tensors(name, base, inputs, seed=seed, chunk_elements=chunk_elements, **given)


def slerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The textbook formula: sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1, θ the angle between them."""
    v0, v1 = v0.double(), v1.double()
    theta = math.acos(float((v0 @ v1) / (v0.norm() * v1.norm())))
    return ((math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)).float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=atol)


# ------------------------------------------------------------------------------------ linear family
@pytest.mark.parametrize(
    "normalize, expected",
    [
        (True, tensor(2.5, 5.0, -1.0)),  # (1·a + 3·b) / 4
        (False, tensor(10.0, 20.0, -4.0)),
    ],  # 1·a + 3·b
)
def test_linear_is_a_weighted_sum_divided_by_the_weights_when_normalized(normalize, expected):
    a, b = tensor(1.0, 2.0, 2.0), tensor(3.0, 6.0, -2.0)
    assert_close(run_method("linear", None, [a, b], weight=(1.0, 3.0), normalize=normalize), expected)


@pytest.mark.parametrize(
    "lambda_, normalize, expected_delta",
    [
        (1.0, False, tensor(1.0, 0.0, 0.5)),  # 1·(1,−1,0) + 0.5·(0,2,1)
        (2.0, False, tensor(2.0, 0.0, 1.0)),  # lambda scales the summed delta
        (1.0, True, tensor(1.0, 0.0, 0.5) / 1.5),
    ],  # normalize divides by Σ weight
)
def test_task_arithmetic_adds_weighted_deltas_scaled_by_lambda(lambda_, normalize, expected_delta):
    base = tensor(1.0, 1.0, 1.0)
    a, b = tensor(2.0, 0.0, 1.0), tensor(1.0, 3.0, 2.0)
    merged = run_method("task_arithmetic", base, [a, b], weight=(1.0, 0.5), normalize=normalize, **{"lambda": lambda_})
    assert_close(merged, base + expected_delta)


# --------------------------------------------------------------------------------------------- ties
TIES_BASE = tensor(10.0, 10.0, 10.0, 10.0)
TIES_DELTAS = (
    tensor(3.0, -1.0, 2.0, -0.5),  # density 0.5 keeps 3 and 2
    tensor(-2.0, -4.0, 1.0, 0.2),
)  # density 0.5 keeps −2 and −4


@pytest.mark.parametrize(
    "weight, normalize, expected_delta",
    [
        # weighted kept deltas (3,0,2,0) and (−2,−4,0,0): signs elected +,−,+; each entry's agreeing
        # values averaged over the weights that agree (disjoint mean)
        ((1.0, 1.0), True, tensor(3.0, -4.0, 2.0, 0.0)),
        # weights (1,2): (3,0,2,0) and (−4,−8,0,0); entry 0 now sums to −1, so the second model wins
        ((1.0, 2.0), True, tensor(-2.0, -4.0, 2.0, 0.0)),
        # without normalize the agreeing weighted values are summed
        ((1.0, 2.0), False, tensor(-4.0, -8.0, 2.0, 0.0)),
    ],
)
def test_ties_keeps_top_magnitudes_elects_sign_by_weighted_sum_and_takes_disjoint_mean(
    weight, normalize, expected_delta
):
    inputs = [TIES_BASE + delta for delta in TIES_DELTAS]
    merged = run_method("ties", TIES_BASE, inputs, weight=weight, density=(0.5, 0.5), normalize=normalize)
    assert_close(merged, TIES_BASE + expected_delta)


def test_ties_density_is_per_model():
    inputs = [TIES_BASE + delta for delta in TIES_DELTAS]
    # model 0 keeps only its largest (3); model 1 keeps all four entries
    merged = run_method("ties", TIES_BASE, inputs, weight=(1.0, 1.0), density=(0.25, 1.0))
    # entry 0: 3 vs −2 → + wins → 3; entry 1: −4; entry 2: only 1 → 1; entry 3: only 0.2 → 0.2
    assert_close(merged, TIES_BASE + tensor(3.0, -4.0, 1.0, 0.2))


# -------------------------------------------------------------------------------------- breadcrumbs
# |delta| = 1..10 (shuffled, alternating signs): density 0.5 keeps 5, gamma 0.1 drops the largest,
# so the 4 smallest (1..4) and the largest (10) go and magnitudes 5..9 stay.
CRUMB_DELTA = tensor(7.0, -1.0, 10.0, -4.0, 5.0, -9.0, 2.0, -6.0, 3.0, -8.0)
CRUMB_KEPT = torch.where(CRUMB_DELTA.abs().ge(5) & CRUMB_DELTA.abs().le(9), CRUMB_DELTA, 0.0)


def test_breadcrumbs_drops_the_gamma_largest_and_the_smallest():
    base = torch.linspace(-1, 1, 10)
    merged = run_method("breadcrumbs", base, [base + CRUMB_DELTA], weight=(1.0,), density=(0.5,), gamma=(0.1,))
    assert_close(merged, base + CRUMB_KEPT)
    assert int((merged - base).ne(0).sum()) == 5


def test_breadcrumbs_with_zero_gamma_is_top_k():
    base = torch.zeros(10)
    merged = run_method("breadcrumbs", base, [CRUMB_DELTA], weight=(1.0,), density=(0.3,), gamma=(0.0,))
    assert_close(merged, torch.where(CRUMB_DELTA.abs() >= 8, CRUMB_DELTA, 0.0))


def torch_sort_mask(delta: torch.Tensor, density: float, gamma: float | None) -> torch.Tensor:
    """The entries mergekit's magnitude sparsification keeps: its own sorts of |delta|.float()."""
    magnitudes = delta.abs().reshape(-1).float()
    start, stop, descending = magnitude_positions(magnitudes.numel(), density, gamma)
    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    mask[torch.sort(magnitudes, descending=descending).indices[start:stop]] = True
    return mask.reshape(delta.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [None, 0.02])
def test_magnitude_selection_keeps_the_entries_torch_sort_keeps(dtype, gamma):
    # few distinct magnitudes (many ties at every cut), zeros, both signs, NaN and infinities, chunked
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(50_000, generator=generator) * torch.randint(0, 3, (50_000,), generator=generator)
    values = values.to(dtype)
    values[[7, 4000, 31_000]] = torch.tensor([math.nan, -math.inf, -math.nan], dtype=dtype)
    for density in (0.0001, 0.3, 0.5, 0.97):
        rows = zip(values.split(7_000), torch.zeros_like(values).split(7_000))  # task vector = values
        keep = select_magnitudes(rows, values.numel(), density, gamma)
        assert torch.equal(keep.rows(0, values.numel()), torch_sort_mask(values, density, gamma))
        assert torch.equal(keep.rows(12_345, 999), torch_sort_mask(values, density, gamma)[12_345:13_344])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,gamma", [("ties", None), ("breadcrumbs", 0.1)])
def test_magnitude_selection_of_a_big_bf16_delta_keeps_exactly_the_asked_count(name, gamma, dtype):
    # 1 % updates of bf16 weights are a few ulps: a large share of |delta| ties at the cut, and exactly
    # ⌊density·n⌋ entries survive, the ones torch's sort puts first; read in row chunks
    generator = torch.Generator().manual_seed(5)
    base = (0.02 * torch.randn(1024, 1024, generator=generator)).bfloat16()
    model = (base.float() + 0.0002 * torch.randn(1024, 1024, generator=generator)).bfloat16()
    base, model = base.to(dtype), model.to(dtype)
    extra = {} if gamma is None else {"gamma": (gamma,)}
    merged = run_method(name, base, [model], weight=(1.0,), density=(0.5,), chunk_rows=100, **extra)
    kept = torch_sort_mask(model - base, 0.5, gamma)
    assert torch.equal(merged, base + torch.where(kept, model - base, 0))
    assert int(kept.sum()) == 524_288
    assert int((model - base).abs().eq((model - base).abs()[kept].min()).sum()) > 100_000  # the ties


def test_breadcrumbs_ties_applies_sign_consensus_after_the_band():
    base = torch.zeros(10)
    # the second model's delta is the negation of the first on every entry, smaller by half, so the
    # first model wins every election; both keep the same band, the second contributes nothing
    merged = run_method(
        "breadcrumbs_ties",
        base,
        [CRUMB_DELTA, -0.5 * CRUMB_DELTA],
        weight=(1.0, 1.0),
        density=(0.5, 0.5),
        gamma=(0.1, 0.1),
    )
    assert_close(merged, CRUMB_KEPT)
    # linear breadcrumbs on the same inputs sums both: half of the band
    summed = run_method(
        "breadcrumbs", base, [CRUMB_DELTA, -0.5 * CRUMB_DELTA], weight=(1.0, 1.0), density=(0.5, 0.5), gamma=(0.1, 0.1)
    )
    assert_close(summed, 0.5 * CRUMB_KEPT)


# --------------------------------------------------------------------------------------------- dare
BIG_SHAPE = (400, 500)


@pytest.fixture(scope="module")
def big_task() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    base = torch.randn(BIG_SHAPE, generator=generator)
    return base, base + 0.1 * torch.randn(BIG_SHAPE, generator=generator)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_for_a_seed_and_changes_with_it(name, big_task):
    base, model = (t[:64, :64] for t in big_task)

    def merge(seed: int) -> torch.Tensor:
        return run_method(name, base, [model], weight=(1.0,), density=(0.3,), seed=seed, chunk_rows=16)

    first, again, other = merge(1), merge(1), merge(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_dare_keeps_a_density_fraction_and_l1_rescale_restores_the_delta_norm(density, big_task):
    base, model = big_task
    merged = run_method("dare_linear", base, [model], weight=(1.0,), density=(density,), chunk_rows=128)
    merged_delta, delta = merged - base, model - base
    kept = merged_delta.ne(0).float().mean().item()
    assert kept == pytest.approx(density, abs=0.005)  # 200k Bernoulli draws: σ ≤ 0.0012
    # the rescale is whole-tensor, from masks drawn chunk by chunk in `prepare`: it restores Σ|delta|
    # exactly only if the merge pass draws the same masks again
    assert merged_delta.abs().double().sum().item() == pytest.approx(delta.abs().double().sum().item(), rel=1e-5)
    survivors = merged_delta.ne(0)
    factor = delta.abs().double().sum() / delta[survivors].abs().double().sum()
    assert factor.item() == pytest.approx(1 / density, rel=0.03)
    # one factor for the whole tensor, on every surviving entry
    assert_close(merged, base + torch.where(survivors, factor.float() * delta, 0.0), atol=1e-5)


def test_dare_without_rescale_keeps_surviving_deltas_unchanged(big_task):
    base, model = big_task
    merged = run_method("dare_linear", base, [model], weight=(1.0,), density=(0.5,), rescale=False)
    survivors = merged.ne(base)
    assert torch.allclose(merged[survivors], model[survivors])
    assert survivors.float().mean().item() == pytest.approx(0.5, abs=0.005)


# -------------------------------------------------------------------------------------------- della
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_keep_probability_rises_linearly_with_magnitude_rank_within_each_row(name):
    rows, width, density, epsilon = 20_000, 5, 0.5, 0.4
    magnitudes = torch.tensor([3.0, 1.0, 5.0, 2.0, 4.0])  # ranks 2, 0, 4, 1, 3
    delta = magnitudes.repeat(rows, 1)
    base = torch.zeros(rows, width)
    merged = run_method(
        name, base, [delta], weight=(1.0,), density=(density,), epsilon=(epsilon,), seed=3, chunk_rows=4096
    )
    kept_by_column = merged.ne(0).float().mean(dim=0)
    ranks = magnitudes.argsort().argsort().float()
    expected = (density - epsilon) + ranks / (width - 1) * 2 * epsilon  # 0.1 … 0.9
    torch.testing.assert_close(kept_by_column, expected, atol=0.015, rtol=0)


def test_della_ranks_tied_magnitudes_by_position_and_draws_reproducibly():
    """Equal magnitudes take ranks in order of position: every column below has the same |delta|,
    so the keep probability rises from the first column to the last. The same seed draws the
    same mask."""
    rows, width, density, epsilon = 20_000, 5, 0.5, 0.4
    delta = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]).repeat(rows, 1)
    base = torch.zeros(rows, width)
    merged = run_method("della_linear", base, [delta], weight=(1.0,), density=(density,), epsilon=(epsilon,), seed=5)
    kept_by_column = merged.ne(0).float().mean(dim=0)
    torch.testing.assert_close(kept_by_column, torch.linspace(0.1, 0.9, width), atol=0.015, rtol=0)
    again = run_method("della_linear", base, [delta], weight=(1.0,), density=(density,), epsilon=(epsilon,), seed=5)
    assert torch.equal(merged, again)


@pytest.mark.parametrize("density, epsilon", [(0.5, 0.5), (0.2, 0.3), (0.9, 0.15)])
def test_della_rejects_density_plus_or_minus_epsilon_outside_zero_one(density, epsilon):
    base = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="density ± epsilon"):
        run_method("della", base, [torch.ones(4, 4)], weight=(1.0,), density=(density,), epsilon=(epsilon,))


# -------------------------------------------------------------------------------------------- slerp
SLERP_V0, SLERP_V1 = tensor(1.0, 0.0, 2.0), tensor(0.5, 2.0, -1.0)


@pytest.mark.parametrize("t, expected", [(0.0, SLERP_V0), (1.0, SLERP_V1)])
def test_slerp_ends_are_the_base_and_the_other_model(t, expected):
    assert_close(run_method("slerp", SLERP_V0, [SLERP_V1], t=t), expected)


def test_slerp_of_collinear_vectors_is_lerp():
    base, other = tensor(1.0, 2.0, -1.0), tensor(2.0, 4.0, -2.0)
    assert_close(run_method("slerp", base, [other], t=0.3), 0.7 * base + 0.3 * other)


@pytest.mark.parametrize(
    "v0, v1, t, expected",
    [
        # quarter circle, v0 of length 2: sin(60°)·v0 + sin(30°)·v1 = (√3, ½)
        (tensor(2.0, 0.0), tensor(0.0, 1.0), 1 / 3, tensor(math.sqrt(3), 0.5)),
        # 45° apart, halfway: both coefficients sin(22.5°)/sin(45°)
        (tensor(1.0, 0.0), tensor(1.0, 1.0), 0.5, math.sin(math.pi / 8) / math.sin(math.pi / 4) * tensor(2.0, 1.0)),
    ],
)
def test_slerp_follows_the_analytic_formula_on_two_dimensional_vectors(v0, v1, t, expected):
    assert_close(run_method("slerp", v0, [v1], t=t), expected)
    assert_close(expected, slerp_reference(t, v0, v1))


def test_slerp_angle_is_that_of_the_whole_tensor_not_of_each_row():
    v0 = tensor(1.0, 0.0, 0.0, 2.0, 1.0, 1.0).reshape(3, 2)
    v1 = tensor(0.0, 1.0, 1.0, 1.0, -1.0, 0.5).reshape(3, 2)
    merged = run_method("slerp", v0, [v1], t=0.4, chunk_rows=1)
    assert_close(merged, slerp_reference(0.4, v0.reshape(-1), v1.reshape(-1)).reshape(3, 2))


# ------------------------------------------------------------------------------------------ nuslerp
def test_nuslerp_without_base_interpolates_the_models_by_weight_fraction():
    a, b = tensor(2.0, 0.0), tensor(0.0, 1.0)
    merged = run_method("nuslerp", None, [a, b], weight=(2.0, 1.0))  # t = 1 / (2 + 1)
    assert_close(merged, tensor(math.sqrt(3), 0.5))


def test_nuslerp_with_base_interpolates_the_task_vectors():
    base = tensor(1.0, -1.0)
    merged = run_method("nuslerp", base, [base + tensor(1.0, 0.0), base + tensor(0.0, 1.0)], weight=(1.0, 1.0))
    assert_close(merged, base + tensor(SQRT_HALF, SQRT_HALF))


NUSLERP_A = tensor(1.0, 0.0, 1.0, 1.0).reshape(2, 2)
NUSLERP_B = tensor(0.0, 1.0, 1.0, 0.0).reshape(2, 2)


def test_nuslerp_unflattened_interpolates_each_row_on_its_own():
    merged = run_method("nuslerp", None, [NUSLERP_A, NUSLERP_B], weight=(1.0, 1.0), nuslerp_flatten=False)
    assert_close(merged[0], tensor(SQRT_HALF, SQRT_HALF))  # row 0: a quarter circle
    assert_close(merged[1], slerp_reference(0.5, NUSLERP_A[1], NUSLERP_B[1]))  # row 1: 45°


def test_nuslerp_row_wise_interpolates_each_column_on_its_own():
    merged = run_method(
        "nuslerp", None, [NUSLERP_A, NUSLERP_B], weight=(1.0, 1.0), nuslerp_flatten=False, nuslerp_row_wise=True
    )
    assert_close(merged[:, 0], slerp_reference(0.5, NUSLERP_A[:, 0], NUSLERP_B[:, 0]))  # (1,1) vs (0,1)
    assert_close(merged[:, 1], tensor(SQRT_HALF, SQRT_HALF))  # (0,1) vs (1,0): a quarter circle


def test_nuslerp_row_wise_is_computed_on_the_whole_tensor():
    whole_tensor = METHODS["nuslerp"].whole_tensor
    assert whole_tensor({"nuslerp_row_wise": True, "nuslerp_flatten": False})
    assert not whole_tensor({"nuslerp_row_wise": True, "nuslerp_flatten": True})
    assert not whole_tensor({"nuslerp_row_wise": False, "nuslerp_flatten": False})


# -------------------------------------------------------------------------------------- model_stock
def test_model_stock_moves_from_base_to_average_by_the_angle_ratio():
    base = tensor(1.0, 1.0)
    deltas = [tensor(1.0, 0.0), tensor(0.5, math.sqrt(3) / 2)]  # 60° apart: cos = ½
    ratio = 2 * 0.5 / (1 + (2 - 1) * 0.5)  # N·cos / (1 + (N−1)·cos) = 2/3
    average = base + (deltas[0] + deltas[1]) / 2
    merged = run_method("model_stock", base, [base + d for d in deltas])
    assert_close(merged, ratio * average + (1 - ratio) * base)


def test_model_stock_with_three_models_uses_the_mean_pairwise_cosine():
    base = torch.zeros(3)
    inputs = [tensor(1.0, 0.0, 0.0), tensor(1.0, 1.0, 0.0), tensor(0.0, 0.0, 2.0)]
    cosine = (SQRT_HALF + 0.0 + 0.0) / 3
    ratio = 3 * cosine / (1 + 2 * cosine)
    assert_close(run_method("model_stock", base, inputs), ratio * torch.stack(inputs).mean(dim=0))


def test_model_stock_of_orthogonal_task_vectors_keeps_the_base():
    base = tensor(2.0, 3.0)
    merged = run_method("model_stock", base, [base + tensor(1.0, 0.0), base + tensor(0.0, 4.0)])
    assert_close(merged, base)


def test_model_stock_filter_wise_computes_one_ratio_per_row():
    base = torch.zeros(2, 2)
    a = tensor(1.0, 0.0, 1.0, 0.0).reshape(2, 2)
    b = tensor(0.0, 1.0, 2.0, 0.0).reshape(2, 2)  # row 0 orthogonal (ratio 0), row 1 parallel (ratio 1)
    merged = run_method("model_stock", base, [a, b], filter_wise=True)
    assert_close(merged, tensor(0.0, 0.0, 1.5, 0.0).reshape(2, 2))


# -------------------------------------------------------------------------------------- passthrough
@pytest.mark.parametrize("scale, factor", [(None, 1.0), (0.5, 0.5), (-2.0, -2.0)])
def test_passthrough_copies_its_input_optionally_scaled(scale, factor):
    model = tensor(1.0, -2.0, 3.5)
    assert_close(run_method("passthrough", None, [model], scale=(scale,)), factor * model)


# ---------------------------------------------------------------------------------------------- sce
SCE_BASE = torch.zeros(1, 4)
SCE_INPUTS = [torch.tensor([[2.0, -1.0, 0.0, 1.0]]), torch.tensor([[1.0, 1.0, -3.0, 1.0]])]


def test_sce_weighs_models_by_mean_square_and_erases_minority_signs():
    # mean squares 1.5 and 3 → weights 1/3, 2/3; sums 3, 0, −3, 2 elect +, + (zero), −, +
    merged = run_method("sce", SCE_BASE, SCE_INPUTS)
    assert_close(merged, torch.tensor([[4 / 3, 1.0, -3.0, 1.0]]))


def test_sce_selects_the_entries_that_vary_most_across_models_not_the_largest():
    # variances 0.25, 1, 2.25, 0: ⌊0.5 · 3 non-zero⌋ = 1 entry kept, the third; the fourth, large
    # but equal in both models, is dropped
    merged = run_method("sce", SCE_BASE, SCE_INPUTS, select_topk=0.5)
    assert_close(merged, torch.tensor([[0.0, 0.0, -3.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, chunk_rows", [((3, 5), None), ((97, 103), None), ((97, 103), 13)])
@pytest.mark.parametrize("select_topk", [0.005, 0.5])
def test_sce_keeps_the_entries_torch_topk_picks_among_tied_variances(dtype, shape, chunk_rows, select_topk):
    """Task vectors of a few values tie in variance by the thousand; the selection keeps the entries
    mergekit's `torch.topk` keeps, whether topk heap-selects (a small share) or runs nth_element,
    in one row chunk or several, across the variance kernel's blocks."""
    generator = torch.Generator().manual_seed(3)
    base = torch.zeros(shape, dtype=dtype)
    inputs = [(torch.randint(-3, 4, shape, generator=generator) / 256).to(dtype) for _ in range(3)]
    variances = torch.var(torch.stack(inputs), dim=0, unbiased=False).reshape(-1)
    count = int(torch.count_nonzero(variances) * select_topk)
    expected = torch.zeros(variances.shape, dtype=torch.bool)
    expected[torch.topk(variances.abs(), count).indices] = True
    merged = run_method("sce", base, inputs, chunk_rows=chunk_rows, select_topk=select_topk)
    # on a zero base an entry moves exactly when it is selected: some model's task vector agrees with the elected sign
    assert torch.equal(merged.reshape(-1) != 0, expected)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_sce_select_topk_is_a_share_of_entries(value):
    with pytest.raises(ValueError, match="share of entries"):
        METHODS["sce"].parameters["select_topk"].coerce(value)


# ----------------------------------------------------------------------------------------- nearswap
def test_nearswap_moves_each_entry_toward_the_model_by_at_most_t():
    base, model = tensor(0.0, 0.0, 1.0, 1.0), tensor(0.05, -0.5, 1.2, 1.0)
    assert_close(run_method("nearswap", base, [model], t=0.1), tensor(0.05, -0.1, 1.1, 1.0))


# ------------------------------------------------------------------------------------- arcee_fusion
def test_arcee_fusion_takes_the_model_only_where_its_importance_is_an_outlier():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(16, 32, generator=generator)
    model = base + 0.01 * torch.randn(16, 32, generator=generator)
    model[5, 7] += 3.0
    merged = run_method("arcee_fusion", base, [model])
    from_model = merged == model
    assert torch.equal(from_model | (merged == base), torch.ones_like(from_model))
    assert from_model[5, 7] and 0 < from_model.float().mean() < 0.25


def test_arcee_fusion_takes_the_softmax_of_a_1d_tensor_over_all_its_chunks():
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(40, generator=generator)
    model = base + 0.1 * torch.randn(40, generator=generator)
    assert torch.equal(
        run_method("arcee_fusion", base, [model], chunk_rows=7), run_method("arcee_fusion", base, [model])
    )


# ------------------------------------------------------------------------------- multislerp, karcher
def on_circle(angle: float, norm: float = 1.0) -> torch.Tensor:
    return tensor(norm * math.cos(angle), norm * math.sin(angle))


def test_multislerp_of_two_task_vectors_with_equal_weights_is_their_arc_midpoint_at_the_mean_norm():
    base = tensor(1.0, 1.0)
    merged = run_method("multislerp", base, [base + tensor(2.0, 0.0), base + tensor(0.0, 4.0)], weight=(1.0, 1.0))
    assert_close(merged, base + on_circle(math.pi / 4, 3.0))


def test_multislerp_of_one_model_is_that_model():
    model = tensor(3.0, -1.0)
    assert torch.equal(run_method("multislerp", tensor(1.0, 1.0), [model], weight=(0.5,)), model)


def test_multislerp_interpolates_an_antipodal_pair_linearly():
    base = tensor(1.0, 1.0)
    merged = run_method("multislerp", base, [base + tensor(2.0, 0.0), base - tensor(2.0, 0.0)], weight=(0.5, 0.5))
    assert_close(merged, base)


def test_multislerp_refuses_unit_vectors_whose_weighted_sum_cancels_out():
    with pytest.raises(ValueError, match="cancel out"):
        run_method("multislerp", None, [tensor(1.0, 0.0), tensor(-1.0, 0.0), tensor(0.0, 1.0)], weight=(1.0, 1.0, 0.0))


def test_multislerp_refuses_to_normalise_weights_that_sum_to_zero():
    with pytest.raises(ValueError, match="weight: weights sum to 0"):
        run_method("multislerp", None, [tensor(1.0, 0.0), tensor(0.0, 1.0), tensor(1.0, 1.0)], weight=(1.0, -1.5, 0.5))


def test_karcher_reaches_the_riemannian_mean_not_the_normalised_euclidean_one():
    """On a circle the Karcher mean of directions is the mean of their angles (one step gets there);
    the normalised Euclidean mean, where the steps start, lies nearer the two equal directions."""
    inputs = [on_circle(0.0, 1.0), on_circle(0.0, 2.0), on_circle(2.0, 3.0)]
    assert_close(run_method("karcher", None, inputs), on_circle(2 / 3, 2.0), atol=1e-5)
    start = math.atan2(math.sin(2.0), 2 + math.cos(2.0))
    assert_close(run_method("karcher", None, inputs, max_iter=0), on_circle(start, 2.0), atol=1e-5)


def test_karcher_leaves_inputs_of_zero_norm_out_of_the_direction_but_not_out_of_the_norm():
    assert_close(run_method("karcher", None, [tensor(0.0, 0.0), tensor(3.0, 4.0)]), tensor(1.5, 2.0))


@pytest.mark.parametrize("parameters", [{"max_iter": -1}, {"tol": -1e-5}])
def test_karcher_rejects_negative_iterations_and_tolerances(parameters):
    with pytest.raises(ValueError, match=next(iter(parameters))):
        run_method("karcher", None, [tensor(1.0, 0.0), tensor(0.0, 1.0)], **parameters)


# ---------------------------------------------------------------------------------- ram, ramplus_tl
# Task vectors: entry 1 is changed by both models, entries 0 and 4 by the first alone, entry 3 by the
# second alone (its first model's 1e-6 is below epsilon), entry 2 by none.
RAM_DELTAS = [tensor(1.0, 2.0, 0.0, 1e-6, 5.0), tensor(0.0, 4.0, 0.0, 3.0, 0.0)]


def test_ram_keeps_changes_one_model_makes_and_averages_those_several_make():
    base = tensor(1.0, 1.0, 1.0, 1.0, 1.0)
    merged = run_method("ram", base, [base + delta for delta in RAM_DELTAS])
    assert_close(merged, base + tensor(1.0, 3.0, 0.0, 3.0, 5.0))


def test_ramplus_tl_scales_each_models_unique_changes_by_its_shared_to_unique_ratio():
    """First model: 1 shared, 2 unique entries, so 1 + 0.5·0.5; second: 1 and 1, clamped: 1 + 0.5·0.6."""
    base = torch.zeros(5)
    merged = run_method("ramplus_tl", base, [base + delta for delta in RAM_DELTAS], r=0.5, alpha=0.6)
    assert_close(merged, tensor(1.25, 3.0, 0.0, 3.9, 6.25))


# ------------------------------------------------------------------------------- chunking invariance
# Every method with parameters that exercise its whole-tensor statistics. Random methods run at
# density 1 here (their masks are drawn per row chunk, so only their deterministic part can be
# compared across chunkings; the DARE test above checks the masks agree between the two passes).
CHUNKING_CASES = {
    "linear": dict(weight=(0.2, 0.5, 0.3)),
    "task_arithmetic": dict(weight=(0.2, 0.5, 0.3), **{"lambda": 1.3}),
    "ties": dict(weight=(1.0, 0.5, 0.8), density=(0.3, 0.5, 0.2)),
    "breadcrumbs": dict(weight=(1.0, 0.5, 0.8), density=(0.5, 0.4, 0.6), gamma=(0.05, 0.1, 0.02)),
    "breadcrumbs_ties": dict(weight=(1.0, 0.5, 0.8), density=(0.5, 0.4, 0.6), gamma=(0.05, 0.1, 0.02)),
    "dare_linear": dict(weight=(1.0, 0.5, 0.8), density=(1.0, 1.0, 1.0)),
    "dare_ties": dict(weight=(1.0, 0.5, 0.8), density=(1.0, 1.0, 1.0)),
    "della": dict(weight=(1.0, 0.5, 0.8), density=(1.0, 1.0, 1.0)),
    "della_linear": dict(weight=(1.0, 0.5, 0.8), density=(1.0, 1.0, 1.0)),
    "slerp": dict(t=0.3),
    "nuslerp": dict(weight=(0.4, 0.6)),
    "model_stock": dict(),
    "passthrough": dict(scale=(0.7,)),
    "sce": dict(select_topk=0.5),
    "nearswap": dict(t=0.2),
    "arcee_fusion": dict(),
    "multislerp": dict(weight=(0.5, 0.3, 0.2)),
    "karcher": dict(),
    "ram": dict(epsilon=0.1),
    "ramplus_tl": dict(epsilon=0.3, r=0.5, alpha=0.6),
}


def test_chunking_cases_cover_every_registered_method():
    assert set(CHUNKING_CASES) == set(METHODS)


@pytest.mark.parametrize("name", sorted(CHUNKING_CASES))
def test_merging_in_row_chunks_equals_merging_the_whole_tensor(name):
    method = METHODS[name]
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(13, 6, generator=generator)
    count = method.max_inputs or 3
    inputs = [base + 0.3 * torch.randn(13, 6, generator=generator) for _ in range(count)]
    with_base = None if method.base is BasePolicy.INPUT else base
    params = CHUNKING_CASES[name]
    whole = run_method(name, with_base, inputs, **params)
    chunked = run_method(name, with_base, inputs, chunk_rows=4, **params)
    assert_close(chunked, whole, atol=1e-5)
    assert not torch.equal(whole, inputs[0])  # the merge did something


# ------------------------------------------------------------------------------------------ registry
def test_the_documented_method_table_lists_exactly_the_registered_methods():
    page = (Path(__file__).parents[2] / "docs" / "reference" / "methods.md").read_text()
    table = page.split("# Methods", 1)[1].split("\n\n", 2)[1]
    listed = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert listed == set(METHODS)


def test_schema_is_read_from_the_signature():
    task = METHODS["task_arithmetic"].parameters
    assert task["lambda"].argument == "lambda_" and not task["lambda"].per_model and task["lambda"].default == 1.0
    assert task["weight"].per_model and task["weight"].default is REQUIRED
    assert "sparsification" not in task and "consensus" not in task  # bound by the preset
    assert "gamma" not in task and "epsilon" not in task
    assert METHODS["linear"].parameters["weight"].default is REQUIRED
    assert METHODS["linear"].parameters["normalize"].kind is bool
    assert METHODS["slerp"].parameters["t"].default is REQUIRED and not METHODS["slerp"].parameters["t"].per_model
    assert METHODS["model_stock"].parameters["filter_wise"].kind is bool


@pytest.mark.parametrize(
    "name, parameter, default",
    [
        ("ties", "normalize", True),
        ("ties", "density", 1.0),
        ("task_arithmetic", "normalize", False),
        ("dare_ties", "rescale", True),
        ("dare_ties", "normalize", False),
        ("breadcrumbs", "gamma", 0.01),
        ("breadcrumbs_ties", "normalize", False),
        ("della", "epsilon", 0.15),
        ("della", "normalize", True),
        ("della_linear", "rescale", True),
    ],
)
def test_presets_carry_mergekit_defaults(name, parameter, default):
    assert METHODS[name].parameters[parameter].default == default


@pytest.mark.parametrize(
    "name, per_model",
    [
        ("ties", {"weight", "density"}),
        ("breadcrumbs", {"weight", "density", "gamma"}),
        ("della", {"weight", "density", "epsilon"}),
        ("nuslerp", {"weight"}),
        ("passthrough", {"scale"}),
        ("slerp", set()),
        ("model_stock", set()),
    ],
)
def test_per_model_parameters_are_marked(name, per_model):
    assert {p.name for p in METHODS[name].parameters.values() if p.per_model} == per_model


def test_randomness_is_declared_by_dare_and_della_only():
    assert {name for name, method in METHODS.items() if method.uses_randomness} == {
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
    }


@pytest.mark.parametrize("value, expected", [(True, True), ("false", False), ("TRUE", True), (1, True), (0, False)])
def test_boolean_parameters_accept_yaml_spellings(value, expected):
    assert METHODS["ties"].parameters["normalize"].coerce(value) is expected


@pytest.mark.parametrize("parameter, value", [("normalize", "maybe"), ("normalize", 2), ("lambda", True)])
def test_parameters_reject_values_of_the_wrong_kind(parameter, value):
    with pytest.raises(ValueError):
        METHODS["ties"].parameters[parameter].coerce(value)


def test_unknown_method_is_a_mergewise_error_listing_the_known_ones():
    with pytest.raises(MergewiseError, match="unknown merge_method 'tie'.*linear.*ties"):
        get_method("tie")
    assert get_method("ties") is METHODS["ties"]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_merges_end_to_end_as_merge_tensors_does(name, tiny_family, tmp_path):
    """Adding a method is one function and one registry entry: the recipe's schema, the planner and
    the engine read it from there, and a whole merge writes what `merge_tensors` gives."""
    import mergewise
    from tests.support.tiny_models import read_state_dict

    method = METHODS[name]
    family = tiny_family("llama")
    fine_tunes = family.fine_tunes[: 1 if method.max_inputs == 1 else 2]
    takes_base = method.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)
    required = {parameter.name: 0.5 for parameter in method.parameters.values() if parameter.default is REQUIRED}
    recipe = {
        "merge_method": name,
        "dtype": "float32",
        "models": [{"model": str(path)} for path in fine_tunes],
        "parameters": required,
        **({"base_model": str(family.base)} if takes_base else {}),
    }
    mergewise.merge(recipe, tmp_path / "out", quiet=True, seed=3)
    written, base = read_state_dict(tmp_path / "out"), read_state_dict(family.base)
    inputs = [read_state_dict(path) for path in fine_tunes]
    for tensor in ["model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]:
        merged = merge_tensors(
            name,
            base[tensor].float() if takes_base else None,
            [state[tensor].float() for state in inputs],
            seed=3,
            tensor=tensor,
            **required,
        )
        assert torch.equal(merged, written[tensor]), tensor
