"""From recipe to plan: which output tensor comes from which input tensors, by which method, with
which parameter values. No tensor data is read here, only headers, so every error surfaces first.

No per-architecture tables: a decoder layer is recognised by the first numeric path component of a
tensor name (`model.layers.7.…`, `transformer.h.7.…`), and tied embeddings by the model's config.
With `tokenizer_source` or `tokenizer:`, each input's embedding and head are read through their rows
in the output vocabulary (`checkpoint/vocabulary.py`), so the methods see inputs of one vocabulary.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from mergewise.checkpoint import ModelFolder
from mergewise.checkpoint.vocabulary import (
    INPUT_EMBEDDING_SUFFIXES,
    OutputVocabulary,
    PeerRows,
    TokenRule,
    build_vocabulary,
)
from mergewise.config import (
    InputModel,
    MergeConfig,
    ModelTokenEmbedding,
    OutputModule,
    OutputSlice,
    Parameters,
    ZeroEmbedding,
)
from mergewise.devices import parse_dtype
from mergewise.errors import MergewiseError, RecipeWarning, tolerated
from mergewise.locator import ModelLocator
from mergewise.methods import BasePolicy, MergeMethod, get_method
from mergewise.parameters import ParameterResolver

LAYER_NAME = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?[^.]+\.)(?P<index>\d+)\.(?P<rest>.+)$")
EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings")
OUTPUT_EMBEDDING_NAMES = ("lm_head.weight", "embed_out.weight")
# The modules (of `modules:` recipes) that are a language model: a text-only model's one module, and a
# multimodal model's (see mergewise.structure.model_modules).
LANGUAGE_MODULES = ("default", "text_decoder")


@dataclass(frozen=True)
class TensorSource:
    model: ModelFolder
    name: str
    vocabulary: PeerRows | None = None  # re-indexes an embedding's or head's rows into the output vocabulary

    def map_rows(self, rows: slice) -> torch.Tensor:
        """This input's rows `rows` of the output tensor (mapped from the page cache where they are
        its own rows as stored)."""
        if self.vocabulary is not None:
            return self.vocabulary.read(rows)
        return self.model.map_rows(self.name, rows)


@dataclass
class TensorJob:
    """One output tensor: its inputs (in method order), the base, and resolved parameters."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: list[TensorSource]
    base: TensorSource | None
    shared: dict[str, Any]
    per_model: dict[str, tuple]
    layer: int | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {**self.shared, **self.per_model}


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    jobs: list[TensorJob]
    models: list[ModelFolder]
    reference: ModelFolder  # source of config.json
    tokenizer_source: ModelFolder
    compute_dtype: torch.dtype | None
    source_layers: list[int] | None = None  # for slices: the reference layer behind each output layer
    notes: list[str] = field(default_factory=list)
    # The recipe's base model, also where the method takes it as an input or not at all: recipe
    # blocks measure against it.
    base_model: ModelFolder | None = None
    # The output vocabulary of `tokenizer_source` / `tokenizer:` (None: the tokenizer source's files
    # are copied and every tensor keeps its rows).
    vocabulary: OutputVocabulary | None = None

    def working_memory(self) -> int:
        """Bytes the merge holds beyond its process at its peak, as its method declares them for the
        largest tensor (an estimate; recipe blocks' own work not counted)."""
        largest = max((math.prod(job.shape) for job in self.jobs), default=0)
        return self.method.working_memory.bytes(largest)

    def fetch_weights(self) -> None:
        """Download the Hub weights the plan was made from their headers."""
        for model in self.models:
            model.fetch_weights()


def layer_index(name: str) -> int | None:
    match = LAYER_NAME.match(name)
    return int(match.group("index")) if match else None


def _with_layer(name: str, index: int) -> str:
    match = LAYER_NAME.match(name)
    assert match is not None, f"{name} is not a layer's tensor"
    return f"{match.group('prefix')}{index}.{match.group('rest')}"


# A model the method weighs, with its parameters as the recipe gives them.
Weighted = tuple[ModelFolder, Parameters | None]


class Planner:
    """Builds a MergePlan; one instance per merge. Where the models are is its `locator`'s business,
    the parameter values its `parameters`'; the planner pairs output tensors with their inputs."""

    def __init__(
        self,
        config: MergeConfig,
        config_dir: Path,
        *,
        allow_pickle: bool = False,
        base_model: str | None = None,
        strict: bool = False,
    ):
        self.config = config
        self.strict = strict
        self.base_model = base_model or config.base_model
        self.method = get_method(config.merge_method)
        self.locator = ModelLocator(config_dir, allow_pickle=allow_pickle, strict=strict)
        self.parameters = ParameterResolver(config, self.method, strict=strict)
        self.compute_dtype = parse_dtype(config.dtype, "dtype")
        self.out_dtype = parse_dtype(config.out_dtype, "out_dtype") or self.compute_dtype

    # ------------------------------------------------------------------------------- plan
    def plan(self) -> MergePlan:
        source_layers: list[int] | None = None
        if self.config.models:
            planned = self._plan_every_module(self.config.models)
            jobs, reference = planned or self._plan_models(self.config.models, [self.config.parameters], "models")
        elif self.config.modules:
            jobs, source_layers, reference = self._plan_modules(self.config.modules)
        else:
            assert self.config.slices is not None  # one of the three forms, checked as it loads
            jobs, source_layers, reference = self._plan_slices(self.config.slices)
        tokenizer = self._tokenizer_source(reference)
        base_model = self.locator.model(self.base_model, "base_model") if self.base_model else None
        vocabulary = self.vocabulary if self.config.tokenizer_settings is not None else None
        narrower = {
            str(job.out_dtype).removeprefix("torch.")
            for job in jobs
            if job.out_dtype.is_floating_point and job.out_dtype != torch.float32
        }
        if self.method.mergekit_writes_float32 and narrower:
            warnings.warn(
                f"merge_method {self.method.name}: written in {', '.join(sorted(narrower))} as the recipe "
                "asks; mergekit 0.1.5 writes this method's tensors in float32 whatever the dtype "
                "(out_dtype: float32 gives its files)",
                RecipeWarning,
                stacklevel=2,
            )
        return MergePlan(
            self.config,
            self.method,
            jobs,
            self.locator.folders,
            reference,
            tokenizer,
            self.compute_dtype,
            source_layers,
            base_model=base_model,
            vocabulary=vocabulary,
        )

    def _tokenizer_source(self, reference: ModelFolder) -> ModelFolder:
        settings = self.config.tokenizer_settings
        if settings is None or settings.source in ("base", "union"):
            return self.locator.model(self.config.base_model, "base_model") if self.config.base_model else reference
        return self.locator.model(settings.source, self._tokenizer_key)

    # -------------------------------------------------------------------------- vocabulary
    @property
    def _tokenizer_key(self) -> str:
        return "tokenizer_source" if self.config.tokenizer_source is not None else "tokenizer.source"

    @cached_property
    def vocabulary(self) -> OutputVocabulary:
        """The output vocabulary, built once the recipe's models are located (on the first embedding
        or head planned)."""
        settings = self.config.tokenizer_settings
        assert settings is not None  # asked for only when the recipe sets the vocabulary
        models = [self.locator.model(path, "model") for path in self.config.model_paths()]  # located already
        source: str | ModelFolder = settings.source
        if settings.source not in ("base", "union"):
            source = self.locator.model(settings.source, self._tokenizer_key)
        return build_vocabulary(
            source, models[0], models, list(self._token_rules), settings.pad_to_multiple_of, self._tokenizer_key
        )

    @cached_property
    def _token_rules(self) -> dict[str, TokenRule]:
        """The `tokenizer.tokens` entries, each model reference resolved to a recipe model."""
        settings = self.config.tokenizer_settings
        assert settings is not None  # asked for only when the recipe sets the vocabulary
        rules = {}
        for token, entry in (settings.tokens or {}).items():
            key = f"tokenizer.tokens.{token}.source"
            source = entry.source
            if isinstance(source, ZeroEmbedding):
                rules[token] = TokenRule(key, zero=True, force=entry.force)
            elif isinstance(source, ModelTokenEmbedding):
                rules[token] = TokenRule(
                    key,
                    self._recipe_model(source.model, f"{key}.model"),
                    token=source.token,
                    token_id=source.token_id,
                    force=entry.force,
                )
            else:
                model = self._recipe_model(source, key) if source is not None else None
                rules[token] = TokenRule(key, model, force=entry.force)
        return rules

    def _recipe_model(self, reference: str, key: str) -> ModelFolder:
        """The recipe's model that `reference` names (as the recipe spells it, or the same folder)."""
        paths = self.config.model_paths()
        folders = [candidate.resolve() for candidate in self.locator.candidates(reference) if candidate.is_dir()]
        for path in paths:
            if path == reference or self.locator.model(path, "model").path in folders:
                return self.locator.model(path, "model")
        raise MergewiseError(f"{key}: {reference} is not one of the recipe's models ({', '.join(paths)})")

    def _aligned_rows(
        self, name: str, shape: tuple[int, ...], peers: list[ModelFolder], base: ModelFolder | None
    ) -> dict[ModelFolder, PeerRows | None]:
        """Each peer's rows of the vocabulary tensor `name` in the output vocabulary; its other
        dimensions must match."""
        tensors = [(model, self._tensor_name(model, name, name)) for model in peers]
        for model, tensor in tensors:
            found = model.tensors[tensor].shape
            if not found or not found[0]:
                raise MergewiseError(
                    f"tensor {tensor} of {model.path} has shape {list(found)}: no rows to re-index "
                    "into the output vocabulary"
                )
            if found[1:] != tuple(shape[1:]):
                raise MergewiseError(
                    f"shape mismatch for tensor {tensor}: {model.path} has {list(found)}, expected "
                    f"[vocabulary, {', '.join(map(str, shape[1:]))}]"
                )
        rows = self.vocabulary.align(name, tensors, base, self._token_rules, self.compute_dtype)
        return dict(zip(peers, rows))

    def _plan_models(
        self,
        models: list[InputModel],
        shared_scopes: list[Parameters | None],
        where: str,
        tensors: set[str] | None = None,
    ) -> tuple[list[TensorJob], ModelFolder]:
        """Every tensor of the models (of `tensors` only, where given) merged as a whole; depth
        gradients run over the layers among those tensors."""
        config = self.config
        base = self.locator.model(config.base_model, "base_model") if config.base_model else None
        entries = [
            (self.locator.model(entry.model, f"{where}[{i}].model"), entry.parameters) for i, entry in enumerate(models)
        ]
        if self.method.base is BasePolicy.INPUT and base is not None and all(m is not base for m, _ in entries):
            entries.append((base, None))
        inputs, base = self._split_base(entries, base, where)
        reference = base or inputs[0][0]
        for model, _ in inputs:
            _check_same_architecture(reference, model, "the base" if reference is base else "the first model")
            _check_same_tensors(reference, model)
        names = [name for name in reference.tensors if tensors is None or name in tensors]
        depth = _depth(reference, tensors)
        # mergekit's inputs of every tensor: the listed models, then the base if it is not listed.
        recipe_base = self.locator.model(config.base_model, "base_model") if config.base_model else None
        listed = [model for model, _ in entries] + ([recipe_base] if recipe_base is not None else [])
        peers = (list(dict.fromkeys(listed)), recipe_base)
        jobs = []
        for name in names:
            info = reference.tensors[name]
            layer = layer_index(name)
            t = layer / (depth - 1) if layer is not None and depth > 1 else (1.0 if layer is not None else 0.0)
            sources = [(model, name, params) for model, params in inputs]
            jobs.append(
                self._job(
                    name,
                    info.shape,
                    shared_scopes,
                    sources,
                    TensorSource(base, name) if base else None,
                    t,
                    layer,
                    info.dtype,
                    peers,
                )
            )
        return jobs, reference

    def _reference(self, first_model: str, where: str) -> ModelFolder:
        """The model whose structure the plan follows: the base, else the first model named."""
        if self.config.base_model:
            return self.locator.model(self.config.base_model, "base_model")
        return self.locator.model(first_model, where)

    def _plan_every_module(self, models: list[InputModel]) -> tuple[list[TensorJob], ModelFolder] | None:
        """A multimodal model's `models:` recipe as mergekit plans it, each module from the models with
        depth gradients over its own layers (a vision tower has its own depth); None for a text-only
        model."""
        reference = self._reference(models[0].model, "models[0].model")
        if reference.declared.text_config is None:
            return None
        from mergewise.structure import model_modules  # transformers' model classes: only for these

        jobs = []
        for tensors in model_modules(reference).values():
            jobs += self._plan_models(models, [self.config.parameters], "models", tensors)[0]
        return jobs, reference

    def _plan_modules(self, modules: dict[str, OutputModule]) -> tuple[list[TensorJob], list[int] | None, ModelFolder]:
        """mergekit's `modules:`: each named part of the model merged from its own models or slices, with
        its own parameters (between the models' or slices' and the recipe's); parts the recipe does not
        name are left out, as mergekit leaves them out. Only the language model takes slices (the
        output's config gives the depth of that model alone)."""
        from mergewise.structure import model_modules  # transformers' model classes: only for modules

        first_name, first = next(iter(modules.items()))
        reference = self._reference(first.first_model, f"modules.{first_name}")
        parts = model_modules(reference)
        jobs: list[TensorJob] = []
        source_layers = None
        for name, module in modules.items():
            where = f"modules.{name}"
            if name not in parts:
                raise MergewiseError(
                    f"{where}: {reference.name} ({reference.declared.model_type}) has no module {name}; "
                    f"its modules are {', '.join(sorted(parts))}"
                )
            if module.models:
                scopes = [module.parameters, self.config.parameters]
                jobs += self._plan_models(module.models, scopes, f"{where}.models", parts[name])[0]
                continue
            assert module.slices is not None  # a module gives models or slices, checked as it loads
            if name not in LANGUAGE_MODULES:
                raise MergewiseError(
                    f"{where}.slices: layer slices apply to the language model only ({' or '.join(LANGUAGE_MODULES)}); "
                    f"merge {name} with models:"
                )
            module_jobs, source_layers, _ = self._plan_slices(
                module.slices, module.parameters, f"{where}.", parts[name]
            )
            jobs += module_jobs
        left_out = sorted(set(parts) - set(modules))
        if left_out:
            warnings.warn(
                f"modules: {', '.join(left_out)} not named, so the output holds none of its tensors (as mergekit "
                "writes it); name every module to get a complete model",
                RecipeWarning,
                stacklevel=2,
            )
        return jobs, source_layers, reference

    def _split_base(
        self, entries: list[Weighted], base: ModelFolder | None, where: str
    ) -> tuple[list[Weighted], ModelFolder | None]:
        """Separate the base from the weighted inputs according to the method's contract."""
        method = self.method
        if method.base is BasePolicy.REQUIRED and base is None:
            raise MergewiseError(f"merge_method {method.name} needs base_model")
        if method.base in (BasePolicy.INPUT, BasePolicy.UNUSED):
            inputs, split_base = entries, None
        else:
            inputs = [(model, params) for model, params in entries if model is not base]
            split_base = base
        if not inputs and split_base is not None and method.base_alone_is_base:
            tolerated(
                f"{where}: merge_method {method.name} gets only the base model here, so the base's tensors are "
                "written unchanged, as mergekit writes them",
                strict=self.strict,
            )
            return inputs, split_base
        if len(inputs) < method.min_inputs or (method.max_inputs is not None and len(inputs) > method.max_inputs):
            wanted = (
                f"exactly {method.min_inputs}"
                if method.min_inputs == method.max_inputs
                else f"at least {method.min_inputs}"
                if method.max_inputs is None
                else f"{method.min_inputs} to {method.max_inputs}"
            )
            raise MergewiseError(
                f"{where}: merge_method {method.name} takes {wanted} model(s) besides the base, got {len(inputs)}"
            )
        return inputs, split_base

    def _plan_slices(
        self,
        slices: list[OutputSlice],
        scope: Parameters | None = None,
        prefix: str = "",
        tensors: set[str] | None = None,
    ) -> tuple[list[TensorJob], list[int], ModelFolder]:
        """Layer slices stacked into the output's layers (of a module's `tensors` only, where given,
        with the module's parameters `scope` between the slices' and the recipe's); errors name
        `{prefix}slices[i]`."""
        config = self.config
        jobs: list[TensorJob] = []
        source_layers: list[int] = []
        first_reference = None
        for slice_index, output_slice in enumerate(slices):
            where = f"{prefix}slices[{slice_index}]"
            lengths = {source.layer_range[1] - source.layer_range[0] for source in output_slice.sources}
            if len(lengths) != 1 or min(lengths) <= 0:
                raise MergewiseError(
                    f"{where}: every source needs the same, positive number of layers "
                    f"(got layer_range lengths {sorted(lengths)})"
                )
            length = lengths.pop()
            sources = [
                (self.locator.model(source.model, f"{where}.sources[{i}].model"), source)
                for i, source in enumerate(output_slice.sources)
            ]
            for model, _ in sources:
                if tensors is None and model.declared.text_config is not None:
                    raise MergewiseError(
                        f"{where}: {model.name} is a multimodal model ({model.declared.model_type}): slices would "
                        "cut its vision tower's layers as its language model's; merge it with models:"
                    )
            base_name = output_slice.base_model or config.base_model
            base = self.locator.model(base_name, f"{where}.base_model") if base_name else None
            entries = [(model, source.parameters) for model, source in sources]
            inputs, split_base = self._split_base(entries, base, where)
            base_source = next((source for model, source in sources if model is split_base), None)
            if split_base is not None and base_source is None:
                raise MergewiseError(f"{where}: base model {base_name} must be one of the slice's sources")
            ranges = {id(model): source.layer_range for model, source in sources}
            reference_model, reference_slice = sources[0]
            first_reference = first_reference or reference_model
            for model, source in sources:
                for bound in source.layer_range:
                    if not 0 <= bound <= _depth(model, tensors):
                        raise MergewiseError(
                            f"{where}: layer_range {list(source.layer_range)} is outside "
                            f"{model.name}'s {_depth(model, tensors)} layers"
                        )
            layer_names = [
                name
                for name in reference_model.tensors
                if layer_index(name) == reference_slice.layer_range[0] and (tensors is None or name in tensors)
            ]
            for offset in range(length):
                out_layer = len(source_layers)
                source_layers.append(reference_slice.layer_range[0] + offset)
                t = offset / (length - 1) if length > 1 else 1.0
                for template in layer_names:
                    input_sources = [
                        (model, _with_layer(template, ranges[id(model)][0] + offset), params)
                        for model, params in inputs
                    ]
                    base_tensor = (
                        TensorSource(split_base, _with_layer(template, base_source.layer_range[0] + offset))
                        if split_base is not None and base_source is not None  # both or neither, checked above
                        else None
                    )
                    info = reference_model.tensors[_with_layer(template, reference_slice.layer_range[0] + offset)]
                    jobs.append(
                        self._job(
                            _with_layer(template, out_layer),
                            info.shape,
                            [output_slice.parameters, scope, config.parameters],
                            input_sources,
                            base_tensor,
                            t,
                            out_layer,
                            info.dtype,
                        )
                    )
        assert first_reference is not None  # a recipe's slices are never empty
        jobs = self._non_layer_jobs(first_reference, slices, scope, prefix, tensors) + jobs
        return jobs, source_layers, first_reference

    def _slice_inputs(
        self, slices: list[OutputSlice], index: int, where: str, count: int | None = None
    ) -> tuple[list[ModelFolder], list[Weighted], ModelFolder | None, ModelFolder | None]:
        """Slice `index` read from its first `count` sources: (those sources' models, the method's
        inputs, its base, the slice's base model)."""
        output_slice = slices[index]
        entries = [
            (self.locator.model(source.model, where), source.parameters) for source in output_slice.sources[:count]
        ]
        base_name = output_slice.base_model or self.config.base_model
        base = self.locator.model(base_name, "base_model") if base_name else None
        return ([model for model, _ in entries], *self._split_base(entries, base, where), base)

    def _non_layer_jobs(
        self,
        reference: ModelFolder,
        slices: list[OutputSlice],
        scope: Parameters | None,
        prefix: str,
        tensors: set[str] | None,
    ) -> list[TensorJob]:
        """Embeddings come from the first slice's sources, final norm and head from the last's: as
        mergekit reads them, from as many of its sources as the first slice has."""
        first = self._slice_inputs(slices, 0, f"{prefix}slices[0]")
        count = len(slices[0].sources)
        if len(slices[-1].sources) > count:
            tolerated(
                f"{prefix}slices[{len(slices) - 1}]: the final norm and head are merged from its first {count} "
                f"source(s) only, as many as slices[0] has, as mergekit merges them",
                strict=self.strict,
            )
        last = self._slice_inputs(slices, len(slices) - 1, f"{prefix}slices[{len(slices) - 1}]", count)
        jobs = []
        for name, info in reference.tensors.items():
            if layer_index(name) is not None or (tensors is not None and name not in tensors):
                continue
            slice_index = 0 if any(h in name for h in EMBEDDING_HINTS) else len(slices) - 1
            listed, inputs, base, slice_base = first if slice_index == 0 else last
            sources = [(model, name, params) for model, params in inputs]
            peers = (list(dict.fromkeys(listed)), slice_base)
            jobs.append(
                self._job(
                    name,
                    info.shape,
                    [slices[slice_index].parameters, scope, self.config.parameters],
                    sources,
                    TensorSource(base, name) if base else None,
                    0.0,
                    None,
                    info.dtype,
                    peers,
                )
            )
        return jobs

    def _job(
        self,
        name: str,
        shape: tuple[int, ...],
        shared_scopes: list[Parameters | None],
        sources: list[tuple[ModelFolder, str, Parameters | None]],
        base: TensorSource | None,
        t: float,
        layer: int | None,
        dtype: torch.dtype,
        peers: tuple[list[ModelFolder], ModelFolder | None] | None = None,
    ) -> TensorJob:
        """One output tensor; `peers` (the tensor's inputs in mergekit's order, and its base) decide
        an embedding's or head's rows in a new output vocabulary."""
        aligned = None
        if peers is not None and self.config.tokenizer_settings is not None and _is_vocabulary_tensor(name):
            aligned = self._aligned_rows(name, shape, *peers)
            shape = (self.vocabulary.rows, *shape[1:])
        resolved_inputs = [self._source(model, tensor, name, shape, aligned) for model, tensor, _ in sources]
        if base is not None:
            base = self._source(base.model, base.name, name, shape, aligned)
        shared, per_model = self.parameters.job_parameters(sources, shared_scopes, name, t)
        out_dtype = self.out_dtype or dtype
        if not dtype.is_floating_point:
            out_dtype = dtype
        return TensorJob(name, shape, out_dtype, resolved_inputs, base, shared, per_model, layer)

    def _source(
        self,
        model: ModelFolder,
        tensor: str,
        output: str,
        shape: tuple[int, ...],
        aligned: dict[ModelFolder, PeerRows | None] | None = None,
    ) -> TensorSource:
        """The input tensor, following tied embeddings; checked for presence and shape (`aligned`:
        its rows in the output vocabulary, checked already)."""
        name = self._tensor_name(model, tensor, output)
        if aligned is not None:
            return TensorSource(model, name, aligned[model])
        found = model.tensors[name].shape
        if found != tuple(shape):
            vocab = (
                " (vocabulary sizes differ: tokenizer_source: union or base aligns them)"
                if _is_vocabulary_tensor(output)
                else ""
            )
            raise MergewiseError(
                f"shape mismatch for tensor {tensor}: {model.path} has {list(found)}, expected {list(shape)}{vocab}"
            )
        return TensorSource(model, name)

    def _tensor_name(self, model: ModelFolder, tensor: str, output: str) -> str:
        """The model's name for `tensor`: its input embedding for a tied head."""
        name = tensor
        if name not in model.tensors and name in OUTPUT_EMBEDDING_NAMES and model.tied_embeddings:
            name = next((n for n in model.tensors if n.endswith(INPUT_EMBEDDING_SUFFIXES)), name)
        if name not in model.tensors:
            raise MergewiseError(f"tensor {tensor} is missing in {model.path} (needed for output {output})")
        return name


def _is_vocabulary_tensor(name: str) -> bool:
    """An input embedding or output head: one row per token."""
    return name in OUTPUT_EMBEDDING_NAMES or name.endswith(INPUT_EMBEDDING_SUFFIXES)


def _check_same_architecture(reference: ModelFolder, model: ModelFolder, role: str) -> None:
    found, expected = model.config.get("model_type"), reference.config.get("model_type")
    if found != expected:
        raise MergewiseError(
            f"{model.path} is a {found} model but {role} {reference.path} is a {expected} model; "
            "merged models must share one architecture"
        )


def _check_same_tensors(reference: ModelFolder, model: ModelFolder) -> None:
    """Every tensor of an input must be in the reference too (a tied head may be absent)."""
    for name in model.tensors:
        if name not in reference.tensors and not (name in OUTPUT_EMBEDDING_NAMES and reference.tied_embeddings):
            raise MergewiseError(f"tensor {name} is missing in {reference.path} (present in {model.path})")


def _depth(model: ModelFolder, tensors: set[str] | None = None) -> int:
    """The model's decoder depth: config.json's, which may not claim more layers than the weights
    hold (a layer range or a layer type list is bounded by it), else the weights'; of a module (its
    `tensors`), the layers it holds."""
    if tensors is not None:
        return len({layer_index(name) for name in tensors} - {None})
    indices = [index for index in map(layer_index, model.tensors) if index is not None]
    held = max(indices) + 1 if indices else 0
    declared = model.num_layers
    if declared is not None and declared > held:
        raise MergewiseError(
            f"{model.path / 'config.json'}: declares {declared} decoder layers, but the weights hold {held}"
        )
    return declared or held


def build_plan(
    config: MergeConfig,
    config_dir: Path,
    *,
    allow_pickle: bool = False,
    base_model: str | None = None,
    strict: bool = False,
    download: bool = True,
) -> MergePlan:
    """The plan of a merge, made from the models' headers; then, unless `download` is false, the
    weights of Hub models are downloaded (a recipe that cannot be planned fails before that)."""
    plan = Planner(config, config_dir, allow_pickle=allow_pickle, base_model=base_model, strict=strict).plan()
    if download:
        plan.fetch_weights()
    return plan
