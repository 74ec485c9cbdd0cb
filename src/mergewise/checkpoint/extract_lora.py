"""`mergewise extract-lora FINETUNED BASE OUT --rank R`: a PEFT LoRA adapter that approximates a
fine-tune as its base plus low-rank updates, one truncated SVD per weight matrix (per expert of a
fused mixture-of-experts tensor), one matrix in memory at a time, each pair written where PEFT
attaches it (`mergewise.adapter_targets`). Loadable by `peft`; what each factorisation keeps is
reported.

Only the R leading singular triplets are used, so a matrix much wider than R is not fully
decomposed: a randomized range finder (a gaussian sketch of R + OVERSAMPLING columns, refined by
POWER_ITERATIONS of subspace iteration, then the exact SVD of the projected matrix) costs
O(m·n·R·iterations) against a full SVD's O(m·n·min(m, n)), and its error ‖Δ − B·A‖ stays within
1 % of the exact truncated SVD's (tests/checkpoint/test_extract_lora.py and the benchmark measure
it). Narrower matrices, where the sketch would be half the matrix or more, get the exact SVD."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergewise.adapter_targets import LoraTarget, extraction_targets, pack_expert_factors, stored_matrix
from mergewise.checkpoint.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from mergewise.checkpoint.output import check_output_location, staged_folder
from mergewise.checkpoint.reader import ModelFolder
from mergewise.checkpoint.writer import save_tensors, write_text
from mergewise.errors import MergewiseError

OVERSAMPLING = 8  # sketch columns beyond the rank
POWER_ITERATIONS = 4  # the tail of a fine-tune's difference is flat: the sketch needs refining
SKETCH_SEED = 0  # each matrix's sketch is drawn from its own generator: the same adapter every run


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left [m, k], values [k], right [k, n]): the k = min(rank, m, n) leading singular triplets of
    a float32 matrix, by the randomized range finder where the matrix is wide enough for it to pay."""
    width = rank + OVERSAMPLING
    if 2 * width >= min(matrix.shape):
        left, values, right = torch.linalg.svd(matrix, full_matrices=False)
        return left[:, :rank], values[:rank], right[:rank]
    generator = torch.Generator(device=matrix.device).manual_seed(SKETCH_SEED)
    sketch = torch.randn(matrix.shape[1], width, generator=generator, device=matrix.device)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(POWER_ITERATIONS):  # re-orthonormalised each half step: float32 keeps its precision
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    projected_left, values, right = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ projected_left)[:, :rank], values[:rank], right[:rank]


def extract_lora(
    finetuned: str | Path,
    base: str | Path,
    out_dir: str | Path,
    rank: int,
    *,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, float]:
    """Write the adapter into `out_dir`; return each module's relative reconstruction error
    ‖Δ − B·A‖ / ‖Δ‖ (Frobenius), which `out_dir/extraction.json` records too."""
    if rank < 1:
        raise MergewiseError(f"--rank: must be at least 1, got {rank}")
    tuned, reference = ModelFolder(finetuned), ModelFolder(base)
    out_dir = Path(out_dir).expanduser().resolve()
    check_output_location(out_dir, [tuned.path, reference.path], overwrite)
    fields, targets = extraction_targets(tuned)
    for target in targets.values():
        for part in target.parts:
            info = reference.tensors.get(part.name)
            if info is None or info.shape != tuned.tensors[part.name].shape:
                raise MergewiseError(f"tensor {part.name}: missing from {reference.path} or of another shape there")
    highest = max(min(target.shape) for target in targets.values())
    if rank > highest:  # the zero-padded factors would be sized by the rank alone
        raise MergewiseError(
            f"--rank: {rank} is more than the rank of any weight matrix of {tuned.path} (at most {highest})"
        )
    factors, errors = {}, {}
    for key, target in tqdm(targets.items(), desc="extract-lora", disable=quiet):
        pairs, lost, total = [], 0.0, 0.0
        for expert in range(target.experts):
            delta, culprit = _difference(target, expert, tuned, reference)
            if culprit is not None:
                name = target.parts[0].name if len(target.parts) == 1 else target.parameter
                raise MergewiseError(f"tensor {name}: {culprit} holds NaN or infinity (or their difference overflows)")
            left, values, right = truncated_svd(delta, rank)
            kept = min(rank, len(values))
            root = values[:kept].sqrt()
            # every module gets rank R (a PEFT adapter has one rank); past a matrix's own rank, zeros
            up = torch.zeros(delta.shape[0], rank)
            down = torch.zeros(rank, delta.shape[1])
            up[:, :kept], down[:kept] = left[:, :kept] * root, root[:, None] * right[:kept]
            pairs.append((down, up))
            lost += float((delta - up @ down).norm()) ** 2
            total += float(delta.norm()) ** 2
        down, up = pack_expert_factors(pairs)
        factors[f"{PEFT_PREFIX}{key}.lora_A.weight"] = down
        factors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = up.contiguous()
        errors[target.parameter.removesuffix(".weight")] = (lost / total) ** 0.5 if total > 0 else 0.0
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": fields["target_modules"],
        **({"target_parameters": fields["target_parameters"]} if fields["target_parameters"] else {}),
        "base_model_name_or_path": str(reference.path),
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "fan_in_fan_out": fields["fan_in_fan_out"],
        "use_rslora": False,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    with staged_folder(out_dir, overwrite) as staging:
        save_tensors(factors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        write_text(staging / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        write_text(
            staging / "extraction.json",
            json.dumps(
                {"finetuned": str(tuned.path), "base": str(reference.path), "rank": rank, "relative_error": errors},
                indent=2,
            )
            + "\n",
        )
    return errors


def _difference(
    target: LoraTarget, expert: int, tuned: ModelFolder, reference: ModelFolder
) -> tuple[torch.Tensor, Path | None]:
    """Expert `expert`'s matrix of the fine-tune less the base's, and the folder to blame where it is
    not finite."""
    tuned_matrix = stored_matrix(target, expert, tuned.read)
    delta = tuned_matrix - stored_matrix(target, expert, reference.read)
    if bool(torch.isfinite(delta).all()):
        return delta, None
    return delta, tuned.path if not bool(torch.isfinite(tuned_matrix).all()) else reference.path
