"""`mergewise extract-lora FINETUNED BASE OUT --rank R`: a PEFT LoRA adapter that approximates a
fine-tune as its base plus low-rank updates, one truncated SVD per weight matrix, one tensor in
memory at a time. Loadable by `peft`; what each factorisation keeps is reported."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergewise.checkpoint.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from mergewise.checkpoint.output import check_output_location, staged_folder
from mergewise.checkpoint.reader import ModelFolder
from mergewise.checkpoint.writer import save_tensors, write_text
from mergewise.errors import MergewiseError

EMBEDDING_HINTS = ("embed", "wte", "wpe", "lm_head")


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
    targets = [
        name
        for name, info in tuned.tensors.items()
        if name.endswith(".weight")
        and len(info.shape) == 2
        and info.dtype.is_floating_point
        and not any(hint in name for hint in EMBEDDING_HINTS)
    ]
    if not targets:
        raise MergewiseError(f"{tuned.path}: no 2-D weight matrices to factorise")
    for name in targets:
        if name not in reference.tensors or reference.tensors[name].shape != tuned.tensors[name].shape:
            raise MergewiseError(f"tensor {name}: missing from {reference.path} or of another shape there")
    highest = max(min(tuned.tensors[name].shape) for name in targets)
    if rank > highest:  # the zero-padded factors would be sized by the rank alone
        raise MergewiseError(
            f"--rank: {rank} is more than the rank of any weight matrix of {tuned.path} (at most {highest})"
        )
    factors, errors = {}, {}
    for name in tqdm(targets, desc="extract-lora", disable=quiet):
        delta = tuned.read(name).float() - reference.read(name).float()
        if not bool(torch.isfinite(delta).all()):
            culprit = tuned.path if not bool(torch.isfinite(tuned.read(name)).all()) else reference.path
            raise MergewiseError(f"tensor {name}: {culprit} holds NaN or infinity (or their difference overflows)")
        left, values, right = torch.linalg.svd(delta, full_matrices=False)
        kept = min(rank, len(values))
        root = values[:kept].sqrt()
        # every module gets rank R (a PEFT adapter has one rank); past a matrix's own rank, zeros
        up = torch.zeros(delta.shape[0], rank)
        down = torch.zeros(rank, delta.shape[1])
        up[:, :kept], down[:kept] = left[:, :kept] * root, root[:, None] * right[:kept]
        module = PEFT_PREFIX + name.removesuffix(".weight")
        factors[f"{module}.lora_A.weight"] = down.contiguous()
        factors[f"{module}.lora_B.weight"] = up.contiguous()
        norm = float(delta.norm())
        errors[name.removesuffix(".weight")] = float((delta - up @ down).norm()) / norm if norm > 0 else 0.0
    modules = sorted({name.removesuffix(".weight").rpartition(".")[2] for name in targets})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": modules,
        "base_model_name_or_path": str(reference.path),
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "fan_in_fan_out": False,
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
