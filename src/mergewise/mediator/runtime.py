"""`mergewise.load`: a model folder ready to generate; a Mediator folder routes every sequence.

The transformers model holds the dense expert D, once. For a request, the router reads the prompt's
mean-pooled hidden state (one prefill with D) and picks select / blend / dense; while that group of
sequences runs, the routed tensors hold D + decode(r_t) (select) or D + Σ p_t decode(r_t) (blend),
written into them in place a row chunk at a time. They keep those weights until a request needs
others: the routing prefill sees D's values of the routed tensors, read from the folder's own shards
one decoder layer at a time, without writing them back, so a run of requests for one expert switches once.
Going back to D re-reads it from the shards, bit for bit. No second copy of any weight is made; the
coded residuals stay on the CPU (`offload`) and are decoded a row chunk at a time on the model's
device.
"""

from __future__ import annotations

import functools
import os
import reprlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mergewise.checkpoint import ModelFolder, TensorInfo
from mergewise.checkpoint.files import inside_folder, read_json, validated
from mergewise.checkpoint.pretrained import load_pretrained
from mergewise.checkpoint.reader import map_rows, read_rows, read_safetensors_header
from mergewise.checkpoint.tokens import start_token_id
from mergewise.chunking import row_ranges
from mergewise.devices import parse_dtype, resolve_device
from mergewise.errors import MergewiseError
from mergewise.layerwise import fast_half_matmuls, hidden_state_index, mean_pooled, right_padded
from mergewise.mediator import switching
from mergewise.mediator.codes import CODES, ResidualCode, Stored, matrix_shape
from mergewise.mediator.router import Route, Router
from mergewise.mediator.settings import RouterSettings
from mergewise.structure import CheckpointLayout, causal_lm_class

P = ParamSpec("P")
T = TypeVar("T")

MEDIATOR_FOLDER = "mediator"
MANIFEST_FILE = "mediator.json"
EXPERTS_FILE = "experts.safetensors"
ROUTER_FILE = "router.safetensors"
FEATURE_BATCH = 8  # every layer's hidden states are kept for one batch: keep it small
FUSED_MIN_ROUTED_BYTES = 1 << 30
FORMAT_VERSION = 2  # 1: one sparse code, flat indices or a bitmask per tensor (mergewise 0.1.0 before codes)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as routing sees them (an empty prompt is the start token)."""
    fallback = start_token_id(tokenizer)
    return [tokenizer(prompt)["input_ids"] or [fallback] for prompt in prompts]


def is_mediator_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MEDIATOR_FOLDER).is_dir()


@dataclass
class Generation:
    """Prompt plus generated token ids per sequence (right-padded to one width) and each one's route
    (None for a plain model)."""

    sequences: torch.Tensor
    routes: list[Route | None]


class ExpertBank:
    """Every expert's coded residual of every routed tensor, checked against its code's layout on
    load; `expert_rows` rebuilds rows of D + Σ w_t decode(r_t). `device` None leaves the parts in
    the file and reads the rows a decode needs when it needs them (page cache, not process memory);
    otherwise they are held there."""

    def __init__(self, folder: Path, manifest: dict, dense: ModelFolder, device: torch.device | None):
        self.tasks: list[str] = list(manifest["tasks"])
        # per routed tensor: its code, the code's level, its columns, and which parts are per row
        self.codes: dict[str, tuple[ResidualCode, float | None, int, dict[str, bool]]] = {}
        self.stored: dict[tuple[str, str], dict[str, torch.Tensor | TensorInfo]] = {}
        path = mediator_file(folder, EXPERTS_FILE)
        try:
            entries = {info.name: info for info in read_safetensors_header(path)}
        except OSError as error:
            raise MergewiseError(f"{path}: cannot read the experts ({error})") from None
        for name, spec in manifest["routed_tensors"].items():
            if name not in dense.tensors:
                raise MergewiseError(f"{path}: routed tensor {name} is not in the dense model")
            code, level = _code_of(spec, f"{folder / MEDIATOR_FOLDER / MANIFEST_FILE}: routed tensor {name}")
            info = dense.tensors[name]
            rows, columns = matrix_shape(tuple(info.shape))
            layout = code.layout(rows, columns, info.dtype, level)
            self.codes[name] = (code, level, columns, {suffix: part.per_row for suffix, part in layout.items()})
            for task in self.tasks:
                prefix = f"{task}/{name}"
                found = {suffix: entries[f"{prefix}.{suffix}"] for suffix in layout if f"{prefix}.{suffix}" in entries}
                parts = {suffix: read_rows(entry) for suffix, entry in found.items()}
                code.validate(parts, rows, columns, info.dtype, level, f"{path}: expert tensor {prefix}")
                held: dict[str, torch.Tensor | TensorInfo] = (
                    {**found} if device is None else {suffix: tensor.to(device) for suffix, tensor in parts.items()}
                )
                self.stored[task, name] = held

    @property
    def tensors(self) -> list[str]:
        return list(self.codes)

    def decode(self, task: str, name: str, rows: slice, device: torch.device) -> torch.Tensor:
        """Rows `rows` of task `task`'s decoded residual of `name` (float32 [rows, columns] on `device`)."""
        code, _, columns, _ = self.codes[name]
        return code.decode(self.parts(task, name, rows, device), columns)

    def entries(
        self, task: str, name: str, rows: slice, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The only columns (and values) of these rows that `decode` sets, for codes that say so."""
        code = self.codes[name][0]
        return None if code.entries is None else code.entries(self.parts(task, name, rows, device))

    def parts(self, task: str, name: str, rows: slice, device: torch.device) -> Stored:
        per_row = self.codes[name][3]
        return {
            suffix: (_rows_of(part, rows if per_row[suffix] else None)).to(device)
            for suffix, part in self.stored[task, name].items()
        }

    def expert_rows(self, name: str, rows: slice, dense_rows: torch.Tensor, mix: dict[str, float]) -> torch.Tensor:
        """D + Σ w_t decode(r_t) on these rows (a [rows, columns] matrix), summed in float32 and rounded
        once to D's dtype: the same numbers whoever asks (serving, export)."""
        total = dense_rows.to(torch.float32, copy=True)
        for task, weight in mix.items():
            if weight:
                decoded = self.decode(task, name, rows, dense_rows.device)
                total.add_(decoded if weight == 1 else decoded.mul_(weight))
        return total.to(dense_rows.dtype)


def _rows_of(part: torch.Tensor | TensorInfo, rows: slice | None) -> torch.Tensor:
    if isinstance(part, TensorInfo):  # mapped, not copied: a switch reads every part once
        return map_rows(part, rows)
    return part if rows is None else part[rows]


def _code_of(spec: Any, where: str) -> tuple[ResidualCode, float | None]:
    if not isinstance(spec, dict) or not isinstance(spec.get("code"), str):
        raise MergewiseError(f"{where}: expected {{code, level}}, got {spec!r}")
    level = spec.get("level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, (int, float)) or not level > 0):
        raise MergewiseError(f"{where}: level must be a positive number or null, got {level!r}")
    if spec["code"] not in CODES:
        raise MergewiseError(f"{where}: unknown residual code {spec['code']!r} (known: {', '.join(CODES)})")
    return CODES[spec["code"]], level


class RoutedModel:
    """A causal LM with its tokenizer; `generate()` returns each sequence's route with the tokens."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        path: Path,
        manifest: dict | None = None,
        router: Router | None = None,
        experts: ExpertBank | None = None,
        dense: ModelFolder | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.path = path
        self.manifest = manifest
        self.router = router
        self.experts = experts
        self.dense = dense  # D's bytes of the routed tensors, re-read to restore them exactly
        self._routed: dict[str, torch.Tensor] = {}  # [rows, columns] views of the routed parameters
        self._mix: dict[str, float] = {}  # what the routed tensors hold now: D + Σ w_t decode(r_t)
        self._kept_dense: dict[str, list] = {}  # D's values where a sparse select wrote: (rows, values)
        self._touched: set[str] = set()  # routed tensors that hold D but at those entries
        self._parameters: dict[str, torch.nn.Parameter] = {}  # the routed parameters themselves
        self._dense_blocks: list[tuple[torch.nn.Module, list[str]]] = []  # see `_dense_forward`
        self._swapped: dict[str, torch.Tensor] = {}  # during `_dense_forward`: what a module's tensors held
        self._swapped_padding: dict[torch.nn.Embedding, int | None] = {}  # …and an embedding's padding_idx
        self._parts: dict[str, str] = {}  # routed tensors that are part of a fused parameter: its name
        if experts is not None:
            named = dict(model.named_parameters())
            layout = CheckpointLayout(model, self._dense_folder)
            owners: dict[str, str] = {}  # routed tensors the model holds under another name
            views: dict[str, dict[str, torch.Tensor]] = {}  # of each fused parameter, by its stored parts
            for name in experts.tensors:
                owner = layout.parameter_of(name) if name in self._dense_folder.tensors else name
                if owner not in named:
                    raise MergewiseError(
                        f"{path}: routed tensor {name} is not a parameter of the {type(model).__name__} model"
                    )
                self._parameters[name] = named[owner]
                if owner != name:
                    owners[name] = owner
                if owner == name or layout.stored_name(owner) == name:  # the whole parameter, maybe renamed
                    self._routed[name] = named[owner].data.view(matrix_shape(tuple(named[owner].shape)))
                else:  # one expert's matrix in a tensor of all the experts (a MoE's, as transformers fuses them)
                    if owner not in views:
                        views[owner] = layout.part_views(owner, named[owner].data)
                    view = views[owner][name]
                    self._routed[name] = view.view(matrix_shape(tuple(view.shape)))
                    self._parts[name] = owner
            self._dense_blocks = dense_blocks(model, experts.tensors, owners)
        # CPU switches through the fused kernels: ~3× faster, for ~0.12 GB of numba and LLVM code in
        # the process, so from FUSED_MIN_ROUTED_BYTES of routed weights on (a fraction of the model then).
        routed_bytes = sum(matrix.numel() * matrix.element_size() for matrix in self._routed.values())
        self.fused_switches = routed_bytes >= FUSED_MIN_ROUTED_BYTES

    @property
    def is_mediator(self) -> bool:
        return self.router is not None

    @property
    def _bank(self) -> ExpertBank:
        """The experts; only a Mediator folder's model routes, so only it ever switches weights."""
        assert self.experts is not None, "a plain model has no routed tensors"
        return self.experts

    @property
    def _dense_folder(self) -> ModelFolder:
        """The folder D's routed tensors are re-read from (a Mediator folder's model only)."""
        assert self.dense is not None, "a plain model has no routed tensors"
        return self.dense

    # ------------------------------------------------------------------------------ routing
    @torch.no_grad()
    def features(
        self, prompt_ids: Sequence[Sequence[int]], layer: int | Sequence[int] = -1, max_tokens: int | None = None
    ) -> torch.Tensor:
        """Mean-pooled hidden state of each prompt at `layer` (several: side by side), with the
        weights the model holds now, computed as the build computed them (`fast_half_matmuls`).

        Prompts are right-padded so every prompt sees positions 0.., as at calibration time."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        pooled = []
        with fast_half_matmuls(self.model, self.device):
            for start in range(0, len(prompt_ids), FEATURE_BATCH):
                batch = right_padded(
                    [
                        list(ids)[-max_tokens:] if max_tokens else list(ids)
                        for ids in prompt_ids[start : start + FEATURE_BATCH]
                    ],
                    pad,
                )
                mask = batch.attention_mask
                assert mask is not None  # right_padded gives one
                # The model without its head: the logits of every prompt token are not needed here.
                hidden = self.model.base_model(
                    input_ids=batch.input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    output_hidden_states=True,
                ).hidden_states
                pooled.append(
                    torch.cat(
                        [
                            mean_pooled(hidden[number], mask)
                            for number in ([layer] if isinstance(layer, int) else layer)
                        ],
                        -1,
                    )
                )
        return torch.cat(pooled)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts)

    def routes(self, prompt_ids: Sequence[Sequence[int]]) -> list[Route | None]:
        if self.router is None:
            return [None] * len(prompt_ids)
        settings = self.router.settings
        layers = settings.hidden_states(self.model.config.get_text_config().num_hidden_layers)
        with self._dense_forward():  # the router was fitted on D's features
            features = self.features(prompt_ids, layers, settings.max_tokens)
        return [*self.router.route(features)]

    @contextmanager
    def _dense_forward(self) -> Iterator[None]:
        """Forward passes inside see D in every routed tensor while the tensors keep what they hold:
        each block with routed tensors (a decoder layer, or a module outside the layers) gets D's
        values, read from the folder into memory of its own, for its own forward only. An embedding
        gets only the rows of the tokens it is given (its ids renumbered into them), so this never
        holds more than one decoder layer's weights besides the model."""
        if not self._mix:
            yield
            return
        handles = []
        for module, names in self._dense_blocks:
            handles.append(module.register_forward_pre_hook(functools.partial(self._swap_in_dense, names)))
            handles.append(module.register_forward_hook(functools.partial(self._swap_back, names)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._swapped.clear()
            self._swapped_padding.clear()

    def _swap_in_dense(self, names: list[str], module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if isinstance(module, torch.nn.Embedding):
            [name] = names
            parameter = self._parameters[name]
            self._swapped[name] = parameter.data
            tokens, renumbered = torch.unique(args[0], return_inverse=True)
            parameter.data = self._dense_folder.map_rows(name)[tokens.cpu()].to(
                device=parameter.device, dtype=parameter.dtype
            )
            # only gradients treat that row apart: the renumbered rows need not hold it
            self._swapped_padding[module] = module.padding_idx
            module.padding_idx = None
            return (renumbered, *args[1:])
        for name, dense in zip(names, self._dense_folder.read_together(names)):
            if name in self._parts:  # a part of a fused tensor: D's values go in place, its own come back after
                matrix = self._routed[name]
                self._swapped[name] = matrix.clone()
                matrix.copy_(dense.view(matrix.shape))
                continue
            parameter = self._parameters[name]
            self._swapped[name] = parameter.data
            parameter.data = dense.to(device=parameter.device, dtype=parameter.dtype).view(parameter.shape)
        return args

    def _swap_back(self, names: list[str], module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        for name in names:
            if name in self._parts:
                self._routed[name].copy_(self._swapped.pop(name))
            else:
                self._parameters[name].data = self._swapped.pop(name)
        if isinstance(module, torch.nn.Embedding) and module in self._swapped_padding:
            module.padding_idx = self._swapped_padding.pop(module)

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
        """Run the block with the route's weights in the routed tensors; they stay after it, until a
        route needs others (`use_weights({})` puts D back)."""
        self.use_weights(route.weights() if route is not None else {})
        yield

    @torch.no_grad()
    def use_weights(self, mix: dict[str, float]) -> None:
        """Write D + Σ w_t decode(r_t) into the routed tensors in place, a row chunk at a time ({} is
        D), always by way of D. A switch cut short (a changed experts file) puts D back whole."""
        mix = {task: weight for task, weight in mix.items() if weight}
        if self.experts is None or mix == self._mix:
            return
        try:
            if self._mix:
                self._restore_dense()
            if mix:
                self._apply(mix)
        except BaseException:
            self._reread_dense()
            raise

    def _reread_dense(self) -> None:
        """D in every routed tensor, whatever they hold now."""
        for name in self._routed:
            self._reread(name)
        self._kept_dense.clear()
        self._touched.clear()
        self._mix = {}

    def _restore_dense(self) -> None:
        """D again: the entries a sparse select wrote get D's kept values back; every other routed
        tensor gets D's rows re-read from the folder."""
        selected = next(iter(self._mix))
        for name, matrix in self._routed.items():
            for rows, dense in self._kept_dense.pop(name, None) or ():
                kept = self._bank.entries(selected, name, rows, matrix.device)
                assert kept is not None  # only codes with entries keep D's values
                columns, _ = kept
                target = matrix[rows]
                if self._fused(target):
                    self._checked(selected, name, switching.put_entries, target, columns, dense)
                else:
                    target.view(-1).index_put_((self._positions(columns, matrix.shape[1]),), dense.reshape(-1))
            if name not in self._touched:
                self._reread(name)
        self._touched.clear()
        self._mix = {}

    def _apply(self, mix: dict[str, float]) -> None:
        """From D. A selected expert whose code sets only a few entries per row (`sparse`) touches
        only those and keeps D's values there (not their positions: they are re-read to restore); on
        the CPU a selected expert's rows are written by the codes' fused kernels where they have one."""
        selected = next(iter(mix)) if list(mix.values()) == [1.0] else None
        for name, matrix in self._routed.items():
            code = self._bank.codes[name][0]
            for rows in row_ranges(tuple(matrix.shape)):
                target = matrix[rows]
                if selected is not None and code.entries is not None:
                    self._add_entries(selected, name, rows, target)
                elif selected is not None and code.add_to is not None and self._fused(target):
                    code.add_to(self._bank.parts(selected, name, rows, matrix.device), target)
                else:
                    target.copy_(self._bank.expert_rows(name, rows, target, mix))
        self._mix = mix

    def _add_entries(self, task: str, name: str, rows: slice, target: torch.Tensor) -> None:
        entries = self._bank.entries(task, name, rows, target.device)
        assert entries is not None  # called for codes with entries only
        columns, values = entries
        if self._fused(target):
            dense = self._checked(task, name, switching.add_entries, target, columns, values)
        else:
            flat = target.view(-1)
            positions = self._positions(columns, target.shape[1])
            dense = flat.take(positions)
            flat.index_put_((positions,), (dense.float() + values.float().view(-1)).to(target.dtype))
            dense = dense.view(columns.shape)
        self._kept_dense.setdefault(name, []).append((rows, dense))
        self._touched.add(name)

    def _fused(self, target: torch.Tensor) -> bool:
        return self.fused_switches and switching.applies(target)

    def _checked(self, task: str, name: str, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`work(*args, **kwargs)`: the experts file is re-read at each switch, so a change to it since
        loading is named."""
        try:
            return work(*args, **kwargs)
        except ValueError as error:
            raise MergewiseError(
                f"{mediator_file(self.path, EXPERTS_FILE)}: expert tensor {task}/{name}: {error}"
            ) from None

    @staticmethod
    def _positions(columns: torch.Tensor, width: int) -> torch.Tensor:
        """Flat positions in a row chunk of the columns per row: indexing a flat view beats
        scattering along rows 4× in bf16."""
        columns = columns.long()
        return (columns + torch.arange(len(columns), device=columns.device)[:, None] * width).view(-1)

    def _reread(self, name: str) -> None:
        matrix = self._routed[name]
        for rows in row_ranges(tuple(matrix.shape)):
            self._read_dense(name, rows, matrix[rows])

    def _read_dense(self, name: str, rows: slice, target: torch.Tensor) -> None:
        """D's stored rows into `target`: read straight into it where it is CPU memory of the stored
        dtype, else converted on the way."""
        dense = self._dense_folder
        span = rows if len(dense.tensors[name].shape) >= 2 else None
        if target.device.type == "cpu" and target.dtype == dense.tensors[name].dtype and target.is_contiguous():
            dense.read(name, span, out=target)
        else:
            target.copy_(dense.read(name, span).reshape(target.shape))

    # --------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_options: Any
    ) -> Generation:
        """transformers' generate(), run once per route group of the (left-padded) batch."""
        input_ids = input_ids.to(self.device)
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(self.device)
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        generate_options.setdefault("pad_token_id", pad)
        outputs: dict[int, torch.Tensor] = {}
        routes: dict[int, Route | None] = {}
        for rows, route in self.groups(prompts):
            index = torch.tensor(rows, device=self.device)
            with self.weights_for(route):
                # PreTrainedModel's generate() comes from GenerationMixin, which its stub does not show
                generated = self.model.generate(  # type: ignore[operator]
                    input_ids=input_ids[index], attention_mask=attention_mask[index], **generate_options
                )
            for position, row in enumerate(rows):
                outputs[row], routes[row] = generated[position], route
        width = max(output.numel() for output in outputs.values())
        sequences = torch.full((len(prompts), width), pad, dtype=input_ids.dtype, device=self.device)
        for row, output in outputs.items():
            sequences[row, : output.numel()] = output
        return Generation(sequences, [routes[row] for row in range(len(prompts))])

    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int = 32, **generate_options: Any
    ) -> list[tuple[str, Route | None]]:
        """Greedy (unless options say otherwise) completions of each prompt, with its route."""
        encoded = self.encode(prompts)
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        generate_options.setdefault("do_sample", False)
        result = self.generate(input_ids, mask, max_new_tokens=max_new_tokens, **generate_options)
        texts = self.tokenizer.batch_decode(result.sequences[:, width:], skip_special_tokens=True)
        return list(zip(texts, result.routes))


def dense_blocks(
    model: torch.nn.Module, names: Sequence[str], owners: dict[str, str] | None = None
) -> list[tuple[torch.nn.Module, list[str]]]:
    """The routed parameters grouped by the block whose forward uses them: the numbered child of a
    module list (a decoder layer) that holds them, else their own module; an embedding's weight stays
    alone, since only the rows of its tokens are swapped in. One block's tensors are read in one go.
    `owners` names the parameter a routed tensor is part of, where that is another."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        module_name = (owners or {}).get(name, name).rpartition(".")[0]
        parts = module_name.split(".")
        numbered = next((index for index, part in enumerate(parts) if part.isdigit()), None)
        if numbered is not None and not isinstance(model.get_submodule(module_name), torch.nn.Embedding):
            module_name = ".".join(parts[: numbered + 1])
        blocks.setdefault(module_name, []).append(name)
    return [(model.get_submodule(module_name), names) for module_name, names in blocks.items()]


def load(
    path: str | os.PathLike,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    offload: str = "disk",
    trust_remote_code: bool = False,
) -> RoutedModel:
    """Load a plain or Mediator model folder. `dtype` None keeps the stored dtype; `offload` "disk"
    leaves the coded experts in their file and reads the rows a route switch decodes (so the process
    holds one model), "cpu" keeps them in host memory, "none" on `device`; they are decoded on
    `device` a row chunk at a time;
    `trust_remote_code` lets the folder's own Python run (see `checkpoint.pretrained.load_pretrained`)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MergewiseError(f"{folder}: not a model folder (no config.json)")
    if offload not in ("disk", "cpu", "none"):
        raise MergewiseError(f"offload {offload!r}: expected disk, cpu or none")
    torch_device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype, "dtype")
    try:  # the config first: it says whether the model's own code would run
        config = load_pretrained(AutoConfig.from_pretrained, folder, trust_remote_code=trust_remote_code)
        tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, folder, trust_remote_code=trust_remote_code, config=config
        )
        model = load_pretrained(
            causal_lm_class(config).from_pretrained,
            folder,
            trust_remote_code=trust_remote_code,
            config=config,
            dtype=dtype or "auto",
        )
    except (OSError, ValueError) as error:
        raise MergewiseError(f"{folder}: cannot load model or tokenizer ({error})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(torch_device).eval()  # type: ignore[arg-type]  # transformers' stub types `to` as taking the model
    if not is_mediator_folder(folder):
        return RoutedModel(model, tokenizer, torch_device, folder)
    manifest = read_manifest(folder)
    router = load_router(folder, manifest)
    depth = model.config.get_text_config().num_hidden_layers
    for number in router.settings.hidden_states(depth):
        hidden_state_index(
            number,
            depth,
            f"{folder / MEDIATOR_FOLDER / MANIFEST_FILE}: router.settings.feature_layers",
        )
    dense = ModelFolder(folder)
    experts = ExpertBank(folder, manifest, dense, {"disk": None, "cpu": torch.device("cpu")}.get(offload, torch_device))
    return RoutedModel(model, tokenizer, torch_device, folder, manifest, router, experts, dense)


class RouterRecord(BaseModel):
    """mediator.json's `router`: what `Router.from_state` builds the router of, with its tensors."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    tasks: list[Annotated[str, Field(strict=True)]]
    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    settings: RouterSettings


class Manifest(BaseModel):
    """The keys of mediator.json that loading reads (each routed tensor's code is checked by
    `_code_of`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    tasks: list[Annotated[str, Field(strict=True)]] = Field(min_length=1)
    routed_tensors: dict[str, Any]
    router: RouterRecord
    settings: dict[str, Any]


def read_manifest(folder: Path) -> dict:
    path = mediator_file(folder, MANIFEST_FILE)
    manifest = read_json(path, "Mediator manifest", folder=folder)
    if not isinstance(manifest, dict):
        raise MergewiseError(f"{path}: expected a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise MergewiseError(
            f"{path}: Mediator format {reprlib.repr(manifest.get('format'))} (built by mergewise "
            f"{str(manifest.get('mergewise_version', 'unknown'))[:40]}); this mergewise reads format "
            f"{FORMAT_VERSION}: build the folder again with `mergewise mediator build`"
        )
    validated(Manifest, manifest, str(path))
    return manifest


def mediator_file(folder: Path, name: str) -> Path:
    """A file of the folder's `mediator/`, which must not lead outside the folder (a downloaded
    folder is untrusted: a symlink there must not make mergewise read a file from elsewhere)."""
    path = folder / MEDIATOR_FOLDER / name
    return inside_folder(path, folder, f"Mediator {name}") if path.exists() or path.is_symlink() else path


def load_router(folder: Path, manifest: dict) -> Router:
    path = mediator_file(folder, ROUTER_FILE)
    try:
        with safe_open(path, framework="pt") as stored:
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}
    except (OSError, SafetensorError) as error:
        raise MergewiseError(f"{path}: cannot read the router ({error})") from None
    router = Router.from_state(tensors, manifest["router"])
    if list(router.tasks) != list(manifest["tasks"]):
        raise MergewiseError(
            f"{path}: the router's tasks {list(router.tasks)} are not the manifest's {list(manifest['tasks'])}"
        )
    return router
