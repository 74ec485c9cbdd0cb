"""Residual codes: encode/decode, their exact storage, row-chunk decoding, the auto allocation."""

from __future__ import annotations

import pytest
import torch

from mergewise.errors import MergewiseError
from mergewise.mediator.allocation import RoutedTensor, allocate, unit_cost
from mergewise.mediator.codes import CODES, get_code
from mergewise.mediator.codes.base import bits_as, pack_bits
from mergewise.mediator.codes.spectrum import SampleSpectrum

LEVELS = {"sparse": 0.25, "lowrank": 4, "lowrank4": 5, "sign1": None, "sign2": None, "full": None}


def residual(rows: int = 24, columns: int = 37, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator) * torch.rand(rows, 1, generator=generator)


def kept_share(code_name: str, matrix: torch.Tensor, level=None) -> float:
    code = get_code(code_name)
    decoded = code.decode(code.encode(matrix, torch.float32, level), matrix.shape[1])
    return 1 - float((matrix - decoded).square().sum() / matrix.square().sum())


@pytest.mark.parametrize("name", sorted(CODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_parts_are_exactly_the_layout(name, dtype):
    code, matrix = CODES[name], residual()
    stored = code.encode(matrix, dtype, LEVELS[name])
    layout = code.layout(*matrix.shape, dtype, LEVELS[name])
    assert set(stored) == set(layout)
    for suffix, part in layout.items():
        assert stored[suffix].dtype == part.dtype and tuple(stored[suffix].shape) == part.shape
    assert sum(t.numel() * t.element_size() for t in stored.values()) == code.stored_bytes(
        *matrix.shape, dtype, LEVELS[name]
    )
    code.validate(stored, *matrix.shape, dtype, LEVELS[name], "expert")


@pytest.mark.parametrize("name", sorted(CODES))
def test_decoding_row_chunks_gives_the_rows_of_the_whole(name):
    code, matrix = CODES[name], residual(rows=30)
    stored = code.encode(matrix, torch.float32, LEVELS[name])
    whole = code.decode(stored, matrix.shape[1])
    layout = code.layout(*matrix.shape, torch.float32, LEVELS[name])
    for rows in (slice(0, 7), slice(7, 8), slice(8, 30)):
        parts = {suffix: tensor[rows] if layout[suffix].per_row else tensor for suffix, tensor in stored.items()}
        if code.row_local:
            assert torch.equal(code.decode(parts, matrix.shape[1]), whole[rows])
        else:  # a matrix product: its last bits depend on how BLAS splits the rows (and on the load)
            torch.testing.assert_close(code.decode(parts, matrix.shape[1]), whole[rows], rtol=1e-5, atol=1e-6)
    if code.row_local:  # encoding a chunk alone gives the chunk's parts
        alone = code.encode(matrix[8:30], torch.float32, LEVELS[name])
        assert all(torch.equal(alone[suffix], stored[suffix][8:30]) for suffix in stored)


def test_sign1_scale_is_the_closed_form_l2_optimum():
    matrix = residual()
    stored = get_code("sign1").encode(matrix, torch.float32, None)
    torch.testing.assert_close(stored["scale"][:, 0], matrix.abs().mean(-1), rtol=1e-6, atol=0)
    decoded = get_code("sign1").decode(stored, matrix.shape[1])
    assert torch.equal(torch.sign(decoded), torch.where(matrix < 0, -1.0, 1.0))
    # any other scale of the same signs is worse
    for factor in (0.9, 1.1):
        assert (matrix - factor * decoded).square().sum() > (matrix - decoded).square().sum()
    # it keeps (Σ|r|)²/n of each row's ‖r‖²
    expected = float((matrix.abs().sum(-1).square() / matrix.shape[1]).sum() / matrix.square().sum())
    assert kept_share("sign1", matrix) == pytest.approx(expected, rel=1e-5)


def test_two_bits_keep_more_than_one_and_sign2_levels_average_their_groups():
    matrix = residual()
    assert kept_share("sign2", matrix) > kept_share("sign1", matrix) > 0.5
    stored = get_code("sign2").encode(matrix, torch.float32, None)
    high = bits_as(stored["high"], matrix.shape[1], 0.0, 1.0).bool()
    for row in range(matrix.shape[0]):
        magnitudes = matrix[row].abs()
        torch.testing.assert_close(stored["levels"][row, 1], magnitudes[high[row]].mean(), rtol=1e-5, atol=0)
        torch.testing.assert_close(stored["levels"][row, 0], magnitudes[~high[row]].mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name, level", [("full", None), ("sparse", 1.0), ("lowrank", 37)])
def test_lossless_cases_are_exact(name, level):
    generator = torch.Generator().manual_seed(3)
    dense = torch.randn(24, 37, generator=generator).to(torch.bfloat16)
    expert = (dense.float() + 0.01 * torch.randn(24, 37, generator=generator)).to(torch.bfloat16)
    code = get_code(name)
    stored = code.encode(expert.float() - dense.float(), torch.float32, level)
    rebuilt = (dense.float() + code.decode(stored, 37)).to(torch.bfloat16)
    if name == "lowrank":  # a full-rank SVD is exact up to float32 rounding
        torch.testing.assert_close(rebuilt.float(), expert.float(), rtol=0, atol=1e-2)
    else:
        assert torch.equal(rebuilt, expert)


@pytest.mark.parametrize("rank", [1, 4, 5, 24])
def test_lowrank4_stores_each_component_in_4_bits_with_its_best_scale(rank):
    """Each factor component is its integers −7…7 (nibbles, odd widths padded with zero) times a
    scale, the one among the clip candidates with the least squared error; decoding is
    (left · scale) @ right."""
    from mergewise.mediator.codes import lowrank, lowrank4

    matrix = residual()
    stored = lowrank4.encode(matrix, torch.float32, rank)
    left = lowrank4._unpack(stored["left"], rank)
    right = lowrank4._unpack(stored["right"], matrix.shape[1])
    for levels in (left, right):
        assert float(levels.abs().max()) <= 7 and torch.equal(levels, levels.round())
    if rank % 2:  # the padding nibble of each left row is the zero level
        assert bool((stored["left"][:, -1] & 15 == 8).all())
    assert bool((stored["right"][:, -1] & 15 == 8).all())  # 37 columns: odd
    torch.testing.assert_close(lowrank4.decode(stored, matrix.shape[1]), (left * stored["scale"]) @ right)
    # every component's scale is its best clip: no candidate quantizes the exact factor with less error
    exact_left, exact_right = lowrank.top_factors(lambda rows: matrix[rows], *matrix.shape, rank)
    for vectors in (exact_left.T, exact_right):
        levels, scale = lowrank4._quantized(vectors)
        error = (vectors - levels * scale[:, None]).square().sum(-1)
        for clip in lowrank4.CLIPS:
            step = vectors.abs().amax(-1, keepdim=True) * clip / 7
            other = (vectors / step).round().clamp(-7, 7) * step
            assert bool((error <= (vectors - other).square().sum(-1) * (1 + 1e-5)).all())


def test_lowrank4_at_nearly_four_times_the_rank_keeps_more_than_lowrank_in_the_same_bytes():
    matrix = residual(rows=64, columns=96)
    lowrank_bytes = get_code("lowrank").stored_bytes(64, 96, torch.bfloat16, 4)
    assert get_code("lowrank4").stored_bytes(64, 96, torch.bfloat16, 15) <= lowrank_bytes
    assert kept_share("lowrank4", matrix, 15) > kept_share("lowrank", matrix, 4)
    assert kept_share("lowrank4", matrix, 96) > 0.96  # full rank: only the 4-bit rounding is lost


def test_lowrank4_shares_from_all_rows_are_what_encoding_keeps():
    from mergewise.mediator.codes.lowrank4 import kept_shares

    matrix = residual()
    shares = kept_shares(SampleSpectrum(matrix), [2, 5, 24])
    for rank in (2, 5, 24):
        assert shares[rank] == pytest.approx(kept_share("lowrank4", matrix, rank), abs=1e-5)
    assert shares[2] < shares[5] < shares[24]


def test_sparse_keeps_the_largest_entries_of_each_row():
    matrix = residual()
    stored = get_code("sparse").encode(matrix, torch.float32, 0.25)
    kept = stored["indices"].long()
    assert kept.shape[1] == int(0.25 * 37)
    threshold = matrix.abs().gather(1, kept).min(-1).values
    dropped = torch.ones_like(matrix, dtype=torch.bool).scatter_(1, kept, False)
    assert bool((matrix.abs()[dropped].reshape(24, -1) <= threshold[:, None]).all())
    assert torch.equal(stored["values"], matrix.gather(1, kept))


@pytest.mark.parametrize("columns", [1, 7, 8, 9, 64, 65])
def test_bits_round_trip(columns):
    bits = torch.rand(5, columns, generator=torch.Generator().manual_seed(columns)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (columns + 7) // 8)
    assert torch.equal(bits_as(packed, columns, 0.0, 1.0), bits.float())
    assert torch.equal(bits_as(packed, columns, 1.0, -1.0), 1.0 - 2.0 * bits.float())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda stored: stored.pop("scale"), "scale is missing"),
        (lambda stored: stored.update(scale=stored["scale"][:-1]), "scale must be"),
        (lambda stored: stored.update(signs=stored["signs"].to(torch.int16)), "signs must be torch.uint8"),
        (lambda stored: stored.update(scale=torch.full_like(stored["scale"], float("inf"))), "NaN or infinite"),
        (lambda stored: stored.update(extra=torch.zeros(1)), "extra is not part of a sign1 expert"),
    ],
)
def test_tampered_parts_are_named(change, message):
    code, matrix = get_code("sign1"), residual()
    stored = code.encode(matrix, torch.float32, None)
    change(stored)
    with pytest.raises(MergewiseError, match=message):
        code.validate(stored, *matrix.shape, torch.float32, None, "experts.safetensors: expert tensor t/w")


def test_sparse_indices_out_of_range_or_unordered_are_refused():
    code, matrix = get_code("sparse"), residual()
    for position, value in (((0, -1), 40), ((1, 0), -1), ((2, 0), 36)):
        stored = code.encode(matrix, torch.float32, 0.25)
        stored["indices"] = stored["indices"].clone()
        stored["indices"][position] = value
        with pytest.raises(MergewiseError, match="ascending column positions"):
            code.validate(stored, *matrix.shape, torch.float32, 0.25, "expert")


def test_unknown_code_is_named():
    with pytest.raises(MergewiseError, match="unknown residual code 'int3'"):
        get_code("int3")


# ------------------------------------------------------------------------------------- allocation
def units_of(sizes: dict[str, int]) -> dict[str, list[RoutedTensor]]:
    return {
        unit: [
            RoutedTensor(f"{unit}.weight", (rows, 64), torch.bfloat16),
            RoutedTensor(f"{unit}.norm", (64,), torch.bfloat16),
        ]
        for unit, rows in sizes.items()
    }


def test_allocation_never_exceeds_the_budget_and_uses_it_well():
    units = units_of({f"layers.{index}": 32 * (index + 1) for index in range(6)})
    options = [("sign1", None), ("sign2", None), ("sparse", 0.25)]
    generator = torch.Generator().manual_seed(0)
    gains = {
        (unit, option): float(torch.rand(1, generator=generator)) * (1 + index) * unit_cost(units[unit], *option, 2)
        for unit in units
        for index, option in enumerate(options)
    }
    everything = sum(max(unit_cost(units[unit], *option, 2) for option in options) for unit in units)
    totals = {unit: max(gains[unit, option] for option in options) * 1.5 for unit in units}
    for share in (0.0, 0.05, 0.2, 0.5, 1.0):
        allocation = allocate(units, options, gains, totals, share * everything, 2)
        spent = sum(unit_cost(units[unit], *option, 2) for unit, option in allocation.choices.items())
        assert spent == allocation.stored_bytes <= share * everything
    best = allocate(units, options, gains, totals, everything, 2)
    assert len(best.choices) == len(units)  # with room for everything every unit takes its best option
    assert all(
        gains[unit, option] == max(gains[unit, other] for other in options) for unit, option in best.choices.items()
    )


def test_allocation_first_raises_the_worst_kept_unit():
    units = units_of({"a": 64, "b": 64})
    options = [("sign1", None), ("sign2", None)]
    cost = {option: unit_cost(units["a"], *option, 1) for option in options}
    gains = {
        ("a", ("sign1", None)): 0.9,
        ("a", ("sign2", None)): 0.95,
        ("b", ("sign1", None)): 0.5,
        ("b", ("sign2", None)): 1.0,
    }
    totals = {"a": 1.0, "b": 1.0}
    allocation = allocate(units, options, gains, totals, cost[("sign1", None)] + cost[("sign2", None)], 1)
    assert allocation.choices == {"a": ("sign1", None), "b": ("sign2", None)}  # both keep ≥ 0.9
    # room for one unit only: the one that keeps the most per byte
    assert allocate(units, options, gains, totals, cost[("sign1", None)], 1).choices == {"a": ("sign1", None)}
    # a unit without residual is never routed
    assert "b" not in allocate(units, options, gains, {"a": 1.0, "b": 0.0}, 10 * cost[("sign2", None)], 1).choices


def test_vectors_are_stored_whole():
    vector = RoutedTensor("model.norm.weight", (64,), torch.bfloat16)
    assert vector.option("sign1", None) == ("full", None)
    assert vector.stored_bytes("sign1", None) == 64 * 4


def test_the_estimate_samples_rows_across_chunks_as_one_tensor():
    """Sampled rows are every k-th of the tensor whatever its chunks, and a chunk holding none of
    them only adds to the totals."""
    from mergewise.mediator.allocation import SAMPLED_ROWS, KeptEstimate

    rows = 3 * SAMPLED_ROWS + 2
    options = (("sign1", None), ("lowrank", 2), ("lowrank4", 4))
    vectors = torch.randn(2, rows, 8, generator=torch.Generator().manual_seed(0))
    whole = KeptEstimate(options, {"model.layers.0.w": (rows, 8)})
    whole("model.layers.0.w", slice(0, rows), vectors)
    whole.finish()
    chunked = KeptEstimate(options, {"model.layers.0.w": (rows, 8)})
    for start in range(0, rows, 2):  # chunks of 2 rows: most hold no sampled row (every 4th is)
        chunked("model.layers.0.w", slice(start, start + 2), vectors[:, start : start + 2])
    chunked.finish()
    for task in range(2):
        for option in options:
            assert chunked.share("layers.0", task, option) == pytest.approx(
                whole.share("layers.0", task, option), rel=1e-6
            )
        assert chunked.total["layers.0", task] == pytest.approx(whole.total["layers.0", task], rel=1e-9)


def test_the_randomized_svd_of_a_big_matrix_finds_the_exact_top_rank():
    """Past EXACT_UP_TO entries the low-rank code reads row chunks into a randomized SVD; on a matrix
    of rank 5 plus noise it keeps what the exact SVD keeps."""
    from mergewise.mediator.codes import lowrank

    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(300, 5, generator=generator) @ torch.randn(5, 200, generator=generator)
    matrix = signal + 0.01 * torch.randn(300, 200, generator=generator)
    exact = lowrank.decode(lowrank.encode(matrix, torch.float32, 5), 200)
    reads = []
    stored = lowrank.encode_rows(
        lambda rows: reads.append(rows) or matrix[rows],
        300,
        200,
        torch.float32,
        5,
        exact_up_to=0,
        chunk_entries=64 * 200,
    )
    assert max(rows.stop - rows.start for rows in reads) == 64  # never more than a chunk at a time
    torch.testing.assert_close(lowrank.decode(stored, 200), exact, rtol=0, atol=1e-3)


@pytest.mark.parametrize("rows, columns", [(24, 37), (37, 24)])  # the Gram matrix of the rows / of the columns
def test_sample_spectrum_gives_the_svd_of_the_sample(rows, columns):
    matrix = residual(rows=rows, columns=columns)
    spectrum = SampleSpectrum(matrix)
    left, singular, right = torch.linalg.svd(matrix.double(), full_matrices=False)
    torch.testing.assert_close(spectrum.energies, singular.square(), rtol=1e-9, atol=1e-9)
    factor_left, factor_right = spectrum.factors(5)
    best = (left[:, :5] * singular[:5]) @ right[:5]
    torch.testing.assert_close((factor_left @ factor_right).double(), best, rtol=0, atol=1e-5)
    assert spectrum._decomposition is spectrum._decomposition  # one decomposition for every code and rank


def test_low_rank_shares_from_all_rows_are_the_exact_spectrum():
    from mergewise.mediator.codes.lowrank import kept_energies

    matrix = residual()
    squares = torch.linalg.svdvals(matrix.double()).square()
    shares = kept_energies(SampleSpectrum(matrix), [1, 4, 24])
    assert shares[4] == pytest.approx(float(squares[:4].sum() / squares.sum()))
    assert shares[24] == pytest.approx(1.0) and shares[1] < shares[4]
    assert kept_share("lowrank", matrix, 4) == pytest.approx(shares[4], rel=1e-4)


@pytest.mark.parametrize("name", sorted(CODES))
def test_decoded_rows_are_fresh_memory(name):
    """Serving scales decoded rows in place: that must never reach the stored parts."""
    code, matrix = CODES[name], residual()
    stored = code.encode(matrix, torch.float32, LEVELS[name])
    first = code.decode(stored, matrix.shape[1]).clone()
    code.decode(stored, matrix.shape[1]).mul_(3.0)
    assert torch.equal(code.decode(stored, matrix.shape[1]), first)


@pytest.mark.parametrize("name", ["sign1", "sign2", "sparse"])
@pytest.mark.parametrize(
    "weights_dtype, stored_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize("columns", [37, 64])
def test_fused_switch_kernels_write_the_bits_of_the_torch_path(name, weights_dtype, stored_dtype, columns):
    """D + decode(r) written in place by the CPU kernels equals `(D.float() + decode).to(dtype)` bit for
    bit (widths with and without a partial last byte of bits); a sparse select puts D back exactly."""
    from mergewise.mediator import switching

    code, matrix = CODES[name], residual(rows=19, columns=columns) * 1e-2
    stored = code.encode(matrix, stored_dtype, LEVELS[name])
    dense = (torch.randn(19, columns, generator=torch.Generator().manual_seed(1)) * 0.02).to(weights_dtype)
    expected = (dense.float() + code.decode(stored, columns)).to(weights_dtype)
    weights = dense.clone()
    if code.entries is not None:
        columns_kept, values = code.entries(stored)
        kept = switching.add_entries(weights, columns_kept, values)
        assert torch.equal(weights, expected)
        switching.put_entries(weights, columns_kept, kept)
        assert torch.equal(weights, dense)
    else:
        code.add_to(stored, weights)
        assert torch.equal(weights, expected)


def test_fused_switch_kernels_refuse_columns_outside_the_weights_and_leave_that_row():
    from mergewise.mediator import switching

    weights = torch.zeros(3, 8, dtype=torch.bfloat16)
    columns = torch.tensor([[0, 1], [2, 8], [0, 1]], dtype=torch.int16)
    with pytest.raises(ValueError, match="row 1"):
        switching.add_entries(weights, columns, torch.ones(3, 2, dtype=torch.bfloat16))
    assert weights[1:].abs().sum() == 0  # row 0 was written before the bad row was found; row 1 not at all
    with pytest.raises(ValueError, match="row 0"):
        switching.put_entries(
            weights, torch.tensor([[-1, 0]], dtype=torch.int16), torch.ones(1, 2, dtype=torch.bfloat16)
        )


@pytest.mark.integration
def test_importing_the_runtime_leaves_numba_unloaded():
    """A plain model's `mergewise generate` never pays for numba: the switch kernels load on first use."""
    import subprocess
    import sys

    check = "import sys, mergewise.mediator.runtime; assert 'numba' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0


@pytest.mark.parametrize("name", list(CODES))
def test_every_registered_code_is_read_by_the_recipe_the_allocation_and_the_build(name):
    """Adding a code is one file and one registry entry: what the `mediator:` block accepts, what
    `code: auto` weighs and what a named code's levels are all come from the code's own fields."""
    from pydantic import ValidationError

    from mergewise.mediator.build import estimated_options, fixed_option
    from mergewise.mediator.codes import AUTO_OPTIONS, SELECTABLE
    from mergewise.mediator.settings import MediatorSettings

    code = CODES[name]
    experts = [{"model": "a", "task": "a"}, {"model": "b", "task": "b"}]
    units = {"layers.0": [RoutedTensor("model.layers.0.mlp.up_proj.weight", (64, 48), torch.bfloat16)]}
    if not code.selectable:
        assert name not in SELECTABLE and not code.auto_levels
        with pytest.raises(ValidationError):
            MediatorSettings(code=name, experts=experts)
        return
    assert [level for option, level in AUTO_OPTIONS if option == name] == list(code.auto_levels)
    for level in code.auto_levels:  # every level auto weighs is one the code stores
        code.validate(code.encode(residual(), torch.bfloat16, level), *residual().shape, torch.bfloat16, level, "x")
    threshold = MediatorSettings(code=name, experts=experts, route_threshold=0.5)
    budget = MediatorSettings(code=name, experts=experts, memory_budget=2.0)
    assert fixed_option(threshold, units, None) == (name, code.threshold_level)
    if code.level_setting is None:
        assert fixed_option(budget, units, 1e9) == (name, None)
        return
    assert code.levels == tuple(sorted(code.levels, reverse=True)) and code.threshold_level is not None
    assert fixed_option(budget, units, 1e12) == (name, code.levels[0])  # the largest level that fits
    smallest = unit_cost(units["layers.0"], name, code.levels[-1], 2)
    chosen, level = fixed_option(budget, units, smallest)
    assert chosen == name and level in code.levels and unit_cost(units["layers.0"], name, level, 2) == smallest
    named = MediatorSettings(code=name, experts=experts, **{code.level_setting: code.levels[-1]})
    assert estimated_options(named, units, 1e9) == ((name, code.levels[-1]),)
