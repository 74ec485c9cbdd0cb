"""The one place that turns a model folder into something scoreable. Every scorer (zoo eval, the
lm-eval adapter) goes through `load_model`, so plain and Mediator folders are scored alike: for a
Mediator folder each prompt runs with the weights its route picks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergewise.mediator.runtime import RoutedModel, load


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, ready for inference on `device`; `routing` for Mediator folders."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    path: Path
    routing: RoutedModel | None = None

    def route_groups(self, contexts: Sequence[Sequence[int]]) -> list[tuple[list[int], AbstractContextManager]]:
        """Rows of a batch that share weights, each with the context that puts those weights in place."""
        if self.routing is None:
            return [(list(range(len(contexts))), nullcontext())]
        return [(rows, self.routing.weights_for(route)) for rows, route in self.routing.groups(contexts)]


def load_model(path: str | os.PathLike, device: str = "cpu", trust_remote_code: bool = False) -> LoadedModel:
    """Load a plain or Mediator model folder in float32; the folder's own Python runs only if trusted."""
    routed = load(path, device, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return LoadedModel(
        model=routed.model,
        tokenizer=routed.tokenizer,
        device=routed.device,
        path=routed.path,
        routing=routed if routed.is_mediator else None,
    )
