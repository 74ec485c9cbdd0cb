"""`mergewise.load`: a model folder ready to generate; a Mediator folder routes every sequence.

The transformers model holds the dense expert D. For a request, the router reads the prompt's
mean-pooled hidden state (one prefill with D), picks select / blend / dense, and the routed tensors
are swapped for D + S_t (select: materialised once, kept in an LRU cache) or D + Σ p_t S_t (blend:
per request) only while that group of sequences runs. Sparse experts stay on the CPU until needed.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mergewise.checkpoint.pretrained import load_pretrained
from mergewise.checkpoint.tokens import start_token_id
from mergewise.devices import resolve_device
from mergewise.errors import MergewiseError
from mergewise.mediator.router import Route, Router
from mergewise.mediator.sparse import flat_indices, materialize
from mergewise.plan import parse_dtype

MEDIATOR_FOLDER = "mediator"
MANIFEST_FILE = "mediator.json"
EXPERTS_FILE = "experts.safetensors"
ROUTER_FILE = "router.safetensors"
FEATURE_BATCH = 8  # every layer's hidden states are kept for one batch: keep it small

def is_mediator_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MEDIATOR_FOLDER).is_dir()


@dataclass
class Generation:
    """Prompt plus generated token ids per sequence (right-padded to one width) and each one's route
    (None for a plain model)."""

    sequences: torch.Tensor
    routes: list[Route | None]


class ExpertBank:
    """The sparse experts of a Mediator folder: flat indices and values per task and tensor."""

    def __init__(self, folder: Path, manifest: dict, shapes: dict[str, torch.Size], device: torch.device):
        self.tasks: list[str] = manifest["tasks"]
        self.tensors: list[str] = manifest["routed_tensors"]
        self.entries: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        path = folder / MEDIATOR_FOLDER / EXPERTS_FILE
        try:
            with safe_open(path, framework="pt") as stored:
                for task in self.tasks:
                    for name in self.tensors:
                        parts = {suffix: stored.get_tensor(f"{task}/{name}.{suffix}")
                                 for suffix in ("values", "indices", "mask")
                                 if f"{task}/{name}.{suffix}" in stored.keys()}
                        if "values" not in parts:
                            raise MergewiseError(f"{path}: expert tensor {task}/{name}.values is missing")
                        if name not in shapes:
                            raise MergewiseError(f"{path}: routed tensor {name} is not in the dense model")
                        indices = flat_indices(parts, shapes[name].numel(), f"{path}: expert tensor {task}/{name}")
                        self.entries[task, name] = (indices.to(device), parts["values"].to(device))
        except (OSError, SafetensorError) as error:
            raise MergewiseError(f"{path}: cannot read sparse experts ({error})") from None

    def parts(self, name: str, mix: dict[str, float]) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        return [(*self.entries[task, name], weight) for task, weight in mix.items() if weight]


class RoutedModel:
    """A causal LM with its tokenizer; `generate()` returns each sequence's route with the tokens."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                 path: Path, manifest: dict | None = None, router: Router | None = None,
                 experts: ExpertBank | None = None, cache_size: int = 2):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.path = path
        self.manifest = manifest
        self.router = router
        self.experts = experts
        self.cache_size = cache_size
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._parameters: dict[str, torch.nn.Parameter] = {}
        self._dense: dict[str, torch.Tensor] = {}
        if experts is not None:
            named = dict(model.named_parameters())
            for name in experts.tensors:
                if name not in named:
                    raise MergewiseError(f"{path}: routed tensor {name} is not a parameter of the "
                                         f"{type(model).__name__} model")
                self._parameters[name] = named[name]
                self._dense[name] = named[name].data

    @property
    def is_mediator(self) -> bool:
        return self.router is not None

    # ------------------------------------------------------------------------------ routing
    @torch.no_grad()
    def features(self, prompt_ids: Sequence[Sequence[int]], layer: int = -1, max_tokens: int | None = None) -> torch.Tensor:
        """Mean-pooled hidden state of each prompt at `layer`, with the current (dense) weights.

        Prompts are right-padded so every prompt sees positions 0.., as at calibration time."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        pooled = []
        for start in range(0, len(prompt_ids), FEATURE_BATCH):
            batch = [list(ids)[-max_tokens:] if max_tokens else list(ids)
                     for ids in prompt_ids[start:start + FEATURE_BATCH]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, :len(ids)] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
            states = hidden[layer].float()
            weights = mask[..., None].float()
            pooled.append(((states * weights).sum(1) / weights.sum(1)).cpu())
        return torch.cat(pooled)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        fallback = start_token_id(self.tokenizer)
        return [self.tokenizer(prompt)["input_ids"] or [fallback] for prompt in prompts]

    def routes(self, prompt_ids: Sequence[Sequence[int]]) -> list[Route | None]:
        if self.router is None:
            return [None] * len(prompt_ids)
        settings = self.router.settings
        features = self.features(prompt_ids, settings.feature_layer, settings.max_tokens)
        return self.router.route(features)

    def route_texts(self, prompts: Sequence[str]) -> list[Route | None]:
        return self.routes(self.encode(prompts))

    def groups(self, prompt_ids: Sequence[Sequence[int]]) -> list[tuple[list[int], Route | None]]:
        """Row indices grouped by route: one group per selected task, one for dense, one per blend."""
        grouped: dict[object, tuple[list[int], Route | None]] = {}
        for row, route in enumerate(self.routes(prompt_ids)):
            key = (row if route.decision == "blend" else (route.decision, route.task)) if route else None
            grouped.setdefault(key, ([], route))[0].append(row)
        return list(grouped.values())

    @contextmanager
    def weights_for(self, route: Route | None) -> Iterator[None]:
        """Run the block with the route's weights in the routed tensors, then restore D."""
        mix = route.weights() if route is not None else {}
        if not mix or self.experts is None:
            yield
            return
        weights = self._selected(route.task) if route.decision == "select" else self._materialized(mix)
        try:
            for name, parameter in self._parameters.items():
                parameter.data = weights[name]
            yield
        finally:
            for name, parameter in self._parameters.items():
                parameter.data = self._dense[name]

    def _materialized(self, mix: dict[str, float]) -> dict[str, torch.Tensor]:
        return {name: materialize(dense, self.experts.parts(name, mix)) for name, dense in self._dense.items()}

    def _selected(self, task: str) -> dict[str, torch.Tensor]:
        if task in self._cache:
            self._cache.move_to_end(task)
            return self._cache[task]
        weights = self._materialized({task: 1.0})
        if self.cache_size > 0:
            self._cache[task] = weights
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return weights

    # --------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **generate_options) -> Generation:
        """transformers' generate(), run once per route group of the (left-padded) batch."""
        input_ids = input_ids.to(self.device)
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(self.device)
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        generate_options.setdefault("pad_token_id", pad)
        outputs: list[torch.Tensor | None] = [None] * len(prompts)
        routes: list[Route | None] = [None] * len(prompts)
        for rows, route in self.groups(prompts):
            index = torch.tensor(rows, device=self.device)
            with self.weights_for(route):
                generated = self.model.generate(input_ids=input_ids[index], attention_mask=attention_mask[index],
                                                **generate_options)
            for position, row in enumerate(rows):
                outputs[row], routes[row] = generated[position], route
        width = max(output.numel() for output in outputs)
        sequences = torch.full((len(outputs), width), pad, dtype=input_ids.dtype, device=self.device)
        for row, output in enumerate(outputs):
            sequences[row, :output.numel()] = output
        return Generation(sequences, routes)

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 32, **generate_options
                      ) -> list[tuple[str, Route | None]]:
        """Greedy (unless options say otherwise) completions of each prompt, with its route."""
        encoded = self.encode(prompts)
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        generate_options.setdefault("do_sample", False)
        result = self.generate(input_ids, mask, max_new_tokens=max_new_tokens, **generate_options)
        texts = [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in result.sequences]
        return list(zip(texts, result.routes))


def load(path: str | os.PathLike, device: str = "cpu", dtype: str | torch.dtype | None = None,
         offload: str = "cpu", cache_size: int | None = None, trust_remote_code: bool = False) -> RoutedModel:
    """Load a plain or Mediator model folder. `dtype` None keeps the stored dtype; `offload` "cpu"
    keeps sparse experts in host memory until a route needs them, "none" moves them to `device`;
    `trust_remote_code` lets the folder's own Python run (see `checkpoint.pretrained.load_pretrained`)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MergewiseError(f"{folder}: not a model folder (no config.json)")
    if offload not in ("cpu", "none"):
        raise MergewiseError(f"offload {offload!r}: expected cpu or none")
    torch_device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype, "dtype")
    try:  # the config first: it says whether the model's own code would run
        config = load_pretrained(AutoConfig.from_pretrained, folder, trust_remote_code=trust_remote_code)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, folder, trust_remote_code=trust_remote_code,
                                    config=config)
        model = load_pretrained(AutoModelForCausalLM.from_pretrained, folder, trust_remote_code=trust_remote_code,
                                config=config, dtype=dtype or "auto")
    except (OSError, ValueError) as error:
        raise MergewiseError(f"{folder}: cannot load model or tokenizer ({error})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(torch_device).eval()
    if not is_mediator_folder(folder):
        return RoutedModel(model, tokenizer, torch_device, folder)
    manifest = read_manifest(folder)
    router = load_router(folder, manifest)
    shapes = {name: parameter.shape for name, parameter in model.named_parameters()}
    missing = [name for name in manifest["routed_tensors"] if name not in shapes]
    if missing:
        raise MergewiseError(f"{folder}: routed tensor {missing[0]} is not a parameter of the model")
    experts = ExpertBank(folder, manifest, shapes, torch.device("cpu") if offload == "cpu" else torch_device)
    size = manifest["settings"]["cache_size"] if cache_size is None else cache_size
    return RoutedModel(model, tokenizer, torch_device, folder, manifest, router, experts, size)


def read_manifest(folder: Path) -> dict:
    path = folder / MEDIATOR_FOLDER / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MergewiseError(f"{path}: cannot read ({error})") from None
    for key in ("tasks", "routed_tensors", "router", "settings"):
        if key not in manifest:
            raise MergewiseError(f"{path}: missing key {key!r}")
    return manifest


def load_router(folder: Path, manifest: dict) -> Router:
    path = folder / MEDIATOR_FOLDER / ROUTER_FILE
    try:
        with safe_open(path, framework="pt") as stored:
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    except (OSError, SafetensorError) as error:
        raise MergewiseError(f"{path}: cannot read the router ({error})") from None
    router = Router.from_state(tensors, manifest["router"])
    if list(router.tasks) != list(manifest["tasks"]):
        raise MergewiseError(f"{path}: the router's tasks {list(router.tasks)} are not the manifest's "
                             f"{list(manifest['tasks'])}")
    return router
