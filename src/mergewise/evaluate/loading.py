"""The one place that turns a model folder into something scoreable. Every scorer (zoo eval, the
lm-eval adapter) goes through `load_model`, so new folder types plug in here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mergewise.devices import resolve_device
from mergewise.errors import MergewiseError

MEDIATOR_SUBFOLDER = "mediator"


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, ready for inference on `device`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    path: Path


def load_model(path: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Load a plain Hugging Face model folder.

    A Mediator folder (a model folder with a `mediator/` subfolder) will be loaded here as well; until
    its loader exists it is refused rather than silently scored as its dense backbone."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MergewiseError(f"{folder}: not a model folder (no config.json)")
    if (folder / MEDIATOR_SUBFOLDER).is_dir():
        raise MergewiseError(f"{folder}: Mediator model folders are not supported by this version of eval")
    torch_device = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise MergewiseError(f"{folder}: cannot load model or tokenizer ({error})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(torch_device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, device=torch_device, path=folder)
