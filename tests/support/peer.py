"""Comparing a mergewise output with mergekit's: identical tensors, except where a method's figures
hang on whole-tensor sums or samples (the tolerances below; `tests/methods/test_peer_mergekit.py`
says why each one is what it is)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from mergewise.chunking import row_ranges
from mergewise.methods import METHODS
from tests.support.tiny_models import read_state_dict

# Methods whose result hangs on whole-tensor sums, and the relative Frobenius error allowed for them
# on tensors of several row chunks.
WHOLE_TENSOR_SUMS = ("model_stock", "nuslerp", "sce")
MULTI_CHUNK_SUMS_TOLERANCE = 1e-6
# Tensors of more entries than this have sampled arcee_fusion quartiles in mergekit. A fence a step
# off flips ~0.2 % of the entries between base and model: over 100 samples the error was at most 6e-4
# in bf16 and 5e-4 in float32 recipes.
ARCEE_FUSION_SAMPLE = 1_000_000
ARCEE_FUSION_TOLERANCE = 1e-3
# Measured on the real-size Llama's 2 M-entry tensors: multislerp identical in bf16 (its figures are
# bf16 there, and round alike) and 2.6e-5 in float32; karcher 7.4e-4 in bf16, 8.5e-5 in float32.
SPHERICAL_MEAN_TOLERANCE = {"multislerp": 1e-4, "karcher": 1e-3}


def _tolerance(method: str, merged: torch.Tensor) -> float | None:
    """The relative Frobenius error allowed for a merged tensor (None: it must be identical)."""
    if method in WHOLE_TENSOR_SUMS and len(row_ranges(tuple(merged.shape))) > 1:
        return MULTI_CHUNK_SUMS_TOLERANCE
    if method == "arcee_fusion" and merged.numel() > ARCEE_FUSION_SAMPLE:
        return ARCEE_FUSION_TOLERANCE
    if method in SPHERICAL_MEAN_TOLERANCE and len(row_ranges(tuple(merged.shape))) > 1:
        return SPHERICAL_MEAN_TOLERANCE[method]
    return None


def checkpoint_mismatches(ours: Path, theirs: Path, *, method: str) -> list[str]:
    """Human-readable differences between two merged checkpoints, empty when they are identical."""
    ours_state, theirs_state = read_state_dict(ours), read_state_dict(theirs)
    ours_config, theirs_config = AutoConfig.from_pretrained(ours), AutoConfig.from_pretrained(theirs)
    problems = []
    if ours_config.num_hidden_layers != theirs_config.num_hidden_layers:
        problems.append(f"num_hidden_layers {ours_config.num_hidden_layers} != {theirs_config.num_hidden_layers}")
    for name in sorted(ours_state.keys() | theirs_state.keys()):
        if name not in ours_state or name not in theirs_state:
            # A tied lm_head is the embedding: saving it or not is the same model.
            if not (name == "lm_head.weight" and theirs_config.tie_word_embeddings):
                problems.append(f"{name}: only in {'mergewise' if name in ours_state else 'mergekit'}")
            continue
        a, b = ours_state[name], theirs_state[name]
        if method in METHODS and METHODS[method].mergekit_writes_float32:
            b = b.to(a.dtype)
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: {a.dtype}{list(a.shape)} != mergekit {b.dtype}{list(b.shape)}")
        elif (tolerance := _tolerance(method, a)) is not None:
            error = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()
            if error > tolerance:
                problems.append(f"{name}: relative error {error:.2e}")
        elif not torch.equal(a, b):
            problems.append(f"{name}: {int((a != b).sum())} of {a.numel()} entries differ")
    return problems
