"""The gate (router) vector of every expert at every layer, and how well the gates route.

mergekit-moe's modes, computed as it computes them: `hidden` / `hidden_last` (the last prompt token's
hidden state entering the layer), `hidden_avg` (the mean over the padded prompt), averaged over an
expert's positive prompts, minus its negative prompts' average, normalised; `cheap_embed` (the
normalised sum of the prompts' token embeddings, the same at every layer); `random` and
`uniform_random`. The hidden states come from the base model run one decoder layer at a time
(`layerwise.LayerwiseModel`), in the model's stored dtype, on prompts tokenised and left-padded as
mergekit-moe does.

`mediator` fits each layer's gate on what the gate really sees, the MLP's input at every prompt
token, with the estimator of Mediator's prototype router: features scaled per channel, the experts'
mean feature vectors as prototypes, a temperature fitted on held-out prompts. A gate has no bias, so
the features are scaled but not centred, and the prototypes' common part (which moves every logit
alike) is dropped.

Every mode is scored the same way: an expert's held-out prompt is routed to the expert whose gate
probability, averaged over the prompt's tokens at the MLP's input, is highest. With prompts from the
recipe alone, each expert's positive prompts are split into folds and each fold is scored by gates
fitted without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mergewise.checkpoint import ModelFolder
from mergewise.errors import MergewiseError
from mergewise.layerwise import Batch, LayerwiseModel, fast_half_matmuls
from mergewise.mediator.router import fit_temperature

CROSS_VALIDATION_FOLDS = 5


@dataclass(frozen=True)
class GatePrompts:
    """One gated expert's prompts, as mergekit-moe batches them (one batch per list)."""

    positive: Batch
    negative: Batch | None


def prompt_batch(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> Batch:
    """BOS + prompt, no other special tokens, left-padded with BOS (EOS without one): mergekit-moe's
    tokenisation, so the last position is every prompt's last token."""
    pad = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise MergewiseError("the base model's tokenizer has neither a BOS nor an EOS token to pad prompts with")
    rows = [tokenizer.encode((tokenizer.bos_token or "") + prompt, add_special_tokens=False) for prompt in prompts]
    if empty := [index for index, row in enumerate(rows) if not row]:
        raise MergewiseError(f"prompt {prompts[empty[0]]!r} has no tokens")
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return Batch(ids, mask)


@dataclass
class LayerFeatures:
    """One decoder layer's view of every batch: the hidden states entering it [B, T, H] and the
    MLP's input [B, T, H], in the model's dtype."""

    layer: int
    entering: list[torch.Tensor]
    mlp_inputs: list[torch.Tensor]


def run_layers(
    folder: ModelFolder,
    config: PretrainedConfig,
    batches: Sequence[Batch],
    each_layer: Callable[[LayerFeatures], None],
    *,
    dtype: torch.dtype,
    device: torch.device,
    quiet: bool = False,
) -> None:
    """Run the base model layer by layer over `batches`, handing each layer's features to
    `each_layer` as soon as the layer has run (one layer's weights and features held at a time)."""
    runner = LayerwiseModel(folder, config, dtype=dtype, device=device)
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    handles = [
        _mlp_of(layer, index, folder).register_forward_pre_hook(capture, with_kwargs=True)
        for index, layer in enumerate(runner.layers)
    ]
    entering: list[torch.Tensor] = []

    def observe(number: int, states: list[torch.Tensor]) -> None:
        nonlocal entering
        if number:
            each_layer(LayerFeatures(number - 1, entering, list(captured)))
            captured.clear()
        entering = states

    try:
        with fast_half_matmuls(runner.model, runner.device):
            runner.run(batches, through=runner.num_layers, observe=observe, desc="gates (layers)", quiet=quiet)
    finally:
        for handle in handles:
            handle.remove()


def _mlp_of(layer: nn.Module, index: int, folder: ModelFolder) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise MergewiseError(f"{folder.path}: decoder layer {index} has no `mlp` module to turn into experts")
    return mlp


# --------------------------------------------------------------------------- mergekit's gates
def pooled(states: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, H] float32: the last position (`hidden`, `hidden_last`) or the mean over every position,
    padding included (`hidden_avg`), as mergekit-moe pools."""
    return states.float().mean(1) if mode == "hidden_avg" else states[:, -1].float()


def mean_difference_gate(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """mergekit-moe's hidden-state gate: the positive rows' mean minus the negative rows', normalised."""
    gate = positive.mean(0) - (negative.mean(0) if negative is not None else 0)
    return F.normalize(gate, dim=-1, eps=1e-8)


def embedding_sums(embedding: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B, H] float32: each prompt's token embeddings summed over its real tokens."""
    assert batch.attention_mask is not None  # prompt_batch's batches carry one
    rows = embedding[batch.input_ids].float() * batch.attention_mask[..., None]
    return rows.sum(1)


def cheap_embed_gate(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """mergekit-moe's `cheap_embed` gate from per-prompt embedding sums: the normalised total of the
    positive prompts, minus the negative prompts' normalised total, normalised."""
    gate = F.normalize(positive.sum(0), dim=-1, eps=1e-8)
    if negative is not None:
        gate = gate - F.normalize(negative.sum(0), dim=-1, eps=1e-8)
    return F.normalize(gate, dim=-1, eps=1e-8)


def random_gates(mode: str, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """mergekit-moe's random gates [layers, experts, hidden]: standard normal, or uniform in
    ±1/sqrt(hidden) (torch.nn.Linear's initialisation)."""
    if mode == "random":
        return torch.randn(shape, generator=generator)
    scale = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=generator) * 2 * scale - scale


# --------------------------------------------------------------------------- mediator's gates
def prototype_gate(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """[E, H]: each expert's mean token feature, scaled per channel by the features' RMS over all
    experts, less the mean over experts; mapped back to the unscaled input, so that `x @ gate.T`
    scores the scaled features."""
    every = torch.cat([part.float() for part in tokens])
    scale = every.square().mean(0).sqrt()
    scale = scale.clamp_min(max(1e-6 * float(scale.max()), 1e-12))
    prototypes = torch.stack([(part.float() / scale).mean(0) for part in tokens])
    return (prototypes - prototypes.mean(0)) / scale


# ---------------------------------------------------------------------------- routing scores
def routed_expert(gate: torch.Tensor, tokens: torch.Tensor) -> int:
    """The expert a prompt goes to: the highest gate probability averaged over its tokens [n, H]."""
    probabilities = torch.softmax(tokens.float() @ gate.float().T, dim=-1).mean(0)
    return int(probabilities.argmax())


def real_tokens(states: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
    """Each row's states [n, H] at its real (unpadded) positions."""
    assert batch.attention_mask is not None  # prompt_batch's batches carry one
    return [row[mask.bool()] for row, mask in zip(states, batch.attention_mask)]


@dataclass
class LayerGates:
    """One layer's gates [experts, H] and [gated shared experts, H] (float32), the share of the
    recipe's prompts that gates fitted without them route to their own expert (None with fewer than
    2 prompts per expert), and a `mediator` gate's fitted temperature (already applied)."""

    routed: torch.Tensor
    shared: torch.Tensor
    heldout_share: float | None
    temperature: float | None = None


@dataclass
class _ExpertFeatures:
    """One gated expert's features at one layer: a row per prompt for mergekit's gates (pooled hidden
    states, or embedding sums), and each positive prompt's MLP inputs at its tokens."""

    rows: torch.Tensor
    negative_rows: torch.Tensor | None
    tokens: list[torch.Tensor]


class GateFitter:
    """Builds every layer's gates, called with each layer's `LayerFeatures` of `batches`: for every
    gated expert (the routed ones, then the gated shared ones) its positive prompts and, if it has
    some, its negative ones. `fixed` [layers, gated experts, H]: random gates, scored as they are."""

    def __init__(
        self,
        mode: str,
        prompts: Sequence[GatePrompts],
        routed: int,
        *,
        embedding: torch.Tensor | None = None,
        fixed: torch.Tensor | None = None,
    ):
        self.mode = mode
        self.routed = routed
        self.embedding = embedding  # cheap_embed's token embeddings
        self.fixed = fixed
        self.batches: list[Batch] = []
        self._positions: list[tuple[int, int | None]] = []
        for entry in prompts:
            positive = len(self.batches)
            self.batches.append(entry.positive)
            if entry.negative is not None:
                self.batches.append(entry.negative)
            self._positions.append((positive, positive + 1 if entry.negative is not None else None))
        self.layers: list[LayerGates] = []

    def __call__(self, features: LayerFeatures) -> None:
        experts = [self._features(features, positive, negative) for positive, negative in self._positions]
        routed = experts[: self.routed]
        # a mediator build's shared-expert gates are mergekit's `hidden` ones (their gate is a sigmoid)
        shared_mode = "hidden" if self.mode == "mediator" else self.mode
        shared = [mergekit_gate(shared_mode, expert.rows, expert.negative_rows) for expert in experts[self.routed :]]
        temperature = None
        if self.fixed is not None:
            gate = self.fixed[features.layer, : self.routed]
            shared = list(self.fixed[features.layer, self.routed :])
            scored = [(gate, [expert.tokens for expert in routed])]
        elif self.mode == "mediator":

            def fit(kept: list[list[int]]) -> torch.Tensor:
                return prototype_gate([torch.cat([e.tokens[i] for i in rows]) for e, rows in zip(routed, kept)])

            scored = _cross_validated(fit, routed)
            temperature = _temperature(scored)
            gate = fit([list(range(len(expert.tokens))) for expert in routed]) / temperature
            scored = [(fold_gate / temperature, held) for fold_gate, held in scored]
        else:

            def fit(kept: list[list[int]]) -> torch.Tensor:
                return torch.stack(
                    [mergekit_gate(self.mode, e.rows[rows], e.negative_rows) for e, rows in zip(routed, kept)]
                )

            gate = fit([list(range(len(expert.tokens))) for expert in routed])
            scored = _cross_validated(fit, routed)
        share = _own_share(scored) if scored else None
        self.layers.append(LayerGates(gate, torch.stack(shared) if shared else gate[:0], share, temperature))

    def _features(self, features: LayerFeatures, positive: int, negative: int | None) -> _ExpertFeatures:
        def rows(index: int) -> torch.Tensor:
            if self.mode == "cheap_embed":
                assert self.embedding is not None  # the builder reads it for this mode
                return embedding_sums(self.embedding, self.batches[index])
            return pooled(features.entering[index], "hidden" if self.mode == "mediator" else self.mode)

        tokens = real_tokens(features.mlp_inputs[positive], self.batches[positive])
        return _ExpertFeatures(rows(positive), None if negative is None else rows(negative), tokens)


def mergekit_gate(mode: str, positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    return cheap_embed_gate(positive, negative) if mode == "cheap_embed" else mean_difference_gate(positive, negative)


Scored = list[tuple[torch.Tensor, list[list[torch.Tensor]]]]  # (gate, each expert's held-out prompts' tokens)


def _cross_validated(fit: Callable[[list[list[int]]], torch.Tensor], experts: Sequence[_ExpertFeatures]) -> Scored:
    """Each expert's prompts dealt round-robin into up to CROSS_VALIDATION_FOLDS folds; per fold, the
    gate `fit` builds from the prompts kept (row numbers per expert) and the prompts held out; none
    with fewer than 2 prompts for some expert."""
    parts = min(CROSS_VALIDATION_FOLDS, *(len(expert.tokens) for expert in experts))
    if parts < 2:
        return []
    scored = []
    for part in range(parts):
        kept = [[i for i in range(len(expert.tokens)) if i % parts != part] for expert in experts]
        held = [[tokens for i, tokens in enumerate(expert.tokens) if i % parts == part] for expert in experts]
        scored.append((fit(kept), held))
    return scored


def _temperature(scored: Scored) -> float:
    """The temperature that best predicts held-out tokens' experts from their fold's gate scores."""
    scores, labels = [], []
    for gate, held in scored:
        for expert, prompts in enumerate(held):
            for tokens in prompts:
                scores.append(tokens.float() @ gate.T)
                labels.append(torch.full((len(tokens),), expert))
    return fit_temperature(torch.cat(scores), torch.cat(labels))


def _own_share(scored: Scored) -> float:
    hits = [
        routed_expert(gate, tokens) == expert
        for gate, held in scored
        for expert, prompts in enumerate(held)
        for tokens in prompts
    ]
    return sum(hits) / len(hits)
