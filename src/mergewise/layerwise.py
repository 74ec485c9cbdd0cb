"""A causal LM run one decoder layer at a time, straight from its checkpoint.

The model is built on the meta device. Its stem (embeddings) runs once per batch to capture what the
first decoder layer receives: the hidden states and the other arguments exactly as the model passes
them (attention mask, rotary embeddings, ...). Then each decoder layer in turn is read from the
checkpoint, runs every batch and is freed, and the final norm runs last. Peak memory is one layer's
weights plus the batches' hidden states at one depth, whatever the depth of the model.

AIM's `--stream-layers` calibration watches module inputs through forward hooks on `model`; Mediator's
router reads `pooled_hidden_states`.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from mergewise.checkpoint import ModelFolder
from mergewise.checkpoint.pretrained import load_pretrained
from mergewise.devices import resolve_device
from mergewise.errors import MergewiseError
from mergewise.structure import CheckpointLayout, causal_lm_class


@dataclass(frozen=True)
class Batch:
    """Token ids [batch, tokens] and, for right-padded prompts, their attention mask (1 = token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None


def hidden_state_index(layer: int, num_layers: int, where: str) -> int:
    """`layer` as a hidden state number 0..num_layers of a model of `num_layers` decoder layers
    (negative ones count from the end); one error naming `where` if there is no such state."""
    count = num_layers + 1
    if not -count <= layer < count:
        raise MergewiseError(
            f"{where}: hidden state {layer} does not exist; a model of {num_layers} decoder layers "
            f"has {-count}..{count - 1}"
        )
    return layer % count


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first decoder layer needs to run."""


class LayerwiseModel:
    """Runs batches through a model folder's causal LM one decoder layer at a time, in `dtype`.

    Hidden states are numbered as in transformers' `output_hidden_states`: 0 is the stem's output,
    i the input of decoder layer i, `num_layers` the final norm's output. Forward hooks registered
    on the modules of `model` see each module's real inputs while it runs."""

    def __init__(
        self,
        folder: ModelFolder,
        config: PretrainedConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
        trust_remote_code: bool = False,
    ):
        text_config = config.get_text_config()
        if not dtype.is_floating_point:
            raise MergewiseError(f"dtype {dtype}: expected a floating-point dtype")
        self.folder = folder
        self.device = device
        self.model = _model_skeleton(config, dtype, device, trust_remote_code)
        self.num_layers = text_config.num_hidden_layers
        # attention type of each layer (Gemma 2 and 3 alternate sliding and full): each type gets its own
        # mask and rotary embeddings from the model's forward
        self.layer_types = list(getattr(text_config, "layer_types", None) or [None] * self.num_layers)
        # the language model: a multimodal model's text runs through it alone, its vision tower never runs
        self.language_model = self.model.get_decoder()
        language_name = _module_name(self.model, self.language_model)
        layers_name, self.layers = _decoder_layers(self.language_model, self.num_layers, folder)
        self.layers_name = f"{language_name}.{layers_name}" if language_name else layers_name
        self.head = self.model.get_output_embeddings()
        self.tail = self._tail()
        self.layout = CheckpointLayout(self.model, folder)

    def hidden_state_index(self, layer: int) -> int:
        """`layer` as a hidden state number 0..num_layers (negative ones count from the end)."""
        return hidden_state_index(layer, self.num_layers, str(self.folder.path))

    @torch.inference_mode()
    def run(
        self,
        batches: Sequence[Batch],
        *,
        through: int = -1,
        observe: Callable[[int, list[torch.Tensor]], None] | None = None,
        desc: str = "layers",
        quiet: bool = False,
    ) -> list[torch.Tensor]:
        """Each batch's hidden states number `through`; `observe(number, states)` sees every number
        up to it. Only the layers (and the final norm) that `through` needs are loaded, and each
        batch's states are replaced as it leaves a layer, so one depth's states are held at a time."""
        through = self.hidden_state_index(through)
        states, inputs = self._first_layer_inputs(batches, set(self.layer_types[:through]) or {self.layer_types[0]})
        if observe:
            observe(0, list(states))
        for index in tqdm(range(through), desc=desc, disable=quiet):
            layer = self.layers[index]
            layer_args, layer_kwargs = inputs[self.layer_types[index]]
            with self._loaded(layer, f"{self.layers_name}.{index}"):
                for batch, (args, kwargs) in enumerate(zip(layer_args, layer_kwargs)):
                    states[batch] = _hidden(layer(states[batch], *args, **kwargs))
            if index + 1 == self.num_layers and self.tail is not None:
                with self._loaded(self.tail, _module_name(self.model, self.tail)):
                    for batch, hidden in enumerate(states):
                        states[batch] = self.tail(hidden)
            if observe:
                observe(index + 1, list(states))
            return_freed_memory()
        return states

    # ------------------------------------------------------------------------------- the parts
    def _tail(self) -> nn.Module | None:
        """The one module with parameters between the decoder layers and the head (the final norm);
        every other module outside the layers must be an embedding (the stem)."""
        inside_layers = {id(module) for module in self.layers.modules()}
        tail = [
            module
            for module in self.language_model.modules()
            if any(parameter is not None for parameter in module._parameters.values())
            and id(module) not in inside_layers
            and module is not self.head
            and not isinstance(module, nn.Embedding)
        ]
        if len(tail) > 1:
            raise MergewiseError(
                f"{self.folder.path}: more than one module besides the embeddings lies outside "
                "the decoder layers and the head; it cannot be run layer by layer, "
                "use the in-memory pass"
            )
        return tail[0] if tail else None

    def _first_layer_inputs(self, batches: Sequence[Batch], types: set):
        """Run every batch up to the first decoder layer and keep what it receives: the hidden states,
        and for each attention type in `types` the other arguments its layers get (the mask, the rotary
        embeddings): the stem runs again up to the first layer of each further type, the layers before
        it passing the states through. The stem (every parameter outside the layers, the head, the
        final norm and a multimodal model's vision tower) is loaded only for this."""
        hidden: list[torch.Tensor] = []
        inputs: dict[object, tuple[list, list]] = {}

        def capture_for(layer_type, keep_hidden: bool):
            def capture(module, args, kwargs):
                kwargs = dict(kwargs)
                states = args[0] if args else kwargs.pop("hidden_states")
                if keep_hidden:
                    hidden.append(states)
                inputs.setdefault(layer_type, ([], []))
                inputs[layer_type][0].append(args[1:])
                inputs[layer_type][1].append(kwargs)
                raise _StopForward

            return capture

        not_stem = (
            f"{self.layers_name}.",
            *(f"{_module_name(self.model, module)}." for module in (self.head, self.tail) if module is not None),
            *(f"{name}." for name in _beside(self.model, self.language_model, keep=self.head)),
        )
        firsts = {layer_type: self.layer_types.index(layer_type) for layer_type in types}
        with self._loaded(self.model, "", skip=not_stem):
            for layer_type, first in sorted(firsts.items(), key=lambda item: item[1]):
                # first of the layer's hooks: the caller's see the layer only when it really runs
                handle = self.layers[first].register_forward_pre_hook(
                    capture_for(layer_type, keep_hidden=first == 0), with_kwargs=True, prepend=True
                )
                try:
                    with _passing_through(self.layers, first):
                        for batch in batches:
                            mask = None if batch.attention_mask is None else batch.attention_mask.to(self.device)
                            try:
                                self.model(
                                    input_ids=batch.input_ids.to(self.device), attention_mask=mask, use_cache=False
                                )
                            except _StopForward:
                                pass
                finally:
                    handle.remove()
        return hidden, inputs

    # ------------------------------------------------------------------------------ the weights
    @contextmanager
    def _loaded(self, module: nn.Module, prefix: str, skip: tuple[str, ...] = ()):
        """`module`'s parameters (but those under `skip`) read from the checkpoint, in the dtype the
        model declares for them, on the device; back on the meta device afterwards. A layer's tensors
        come in one read, into one buffer that goes back to the system as a whole afterwards: one
        allocation per tensor left holes in the heap that grew it layer after layer."""
        try:
            wanted = [
                (name, parameter, f"{prefix}.{name}" if prefix else name)
                for name, parameter in module.named_parameters()
                if not name.startswith(skip)
            ]
            loaded = self.layout.read([full_name for _, _, full_name in wanted], self.folder.read_together)
            for (name, parameter, full_name), tensor in zip(wanted, loaded):
                if tensor.shape != parameter.shape:
                    raise MergewiseError(
                        f"{self.folder.path}: tensor {full_name} has shape "
                        f"{list(tensor.shape)}, the model expects {list(parameter.shape)}"
                    )
                dtype = parameter.dtype if tensor.is_floating_point() else tensor.dtype
                _set_parameter(module, name, tensor.to(self.device, dtype))
            yield
        finally:
            for name, parameter in list(module.named_parameters()):
                if parameter.device.type != "meta":
                    _set_parameter(module, name, torch.empty_like(parameter, device="meta"))


def pooled_hidden_states(
    folder: str | Path | ModelFolder,
    prompt_ids: list[list[int]],
    layer: int | Sequence[int] = -1,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    pad_id: int = 0,
    max_tokens: int | None = None,
    quiet: bool = False,
    trust_remote_code: bool = False,
) -> torch.Tensor:
    """Float32 [prompts, hidden]: each prompt's hidden state number `layer` (as in transformers'
    `output_hidden_states`; -1 is the final norm's output) averaged over its tokens, with only its
    last `max_tokens` ids if given; for several numbers, their averages side by side in that order
    ([prompts, hidden × numbers]), from one pass. Prompts are right-padded per batch, so every prompt sees positions
    0.. as in the in-memory model. `dtype` None computes in the checkpoint's stored floating dtype;
    on the CPU half-precision matmuls run as `fast_half_matmuls` says."""
    if batch_size < 1:
        raise MergewiseError(f"batch_size {batch_size}: expected at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise MergewiseError(f"max_tokens {max_tokens}: expected at least 1 (or None for whole prompts)")
    if not prompt_ids:
        raise MergewiseError("no prompts to read hidden states of")
    if empty := [row for row, ids in enumerate(prompt_ids) if not len(ids)]:
        raise MergewiseError(f"prompt {empty[0]} has no token ids")
    folder = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
    try:  # the config first: it says whether the model's own code would run
        config = load_pretrained(AutoConfig.from_pretrained, folder.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise MergewiseError(f"{folder.path}: cannot load its config ({str(error).splitlines()[0]})") from None
    runner = LayerwiseModel(
        folder,
        config,
        dtype=dtype or folder.stored_dtype,
        device=resolve_device(device),
        trust_remote_code=trust_remote_code,
    )
    kept = [list(ids)[-max_tokens:] if max_tokens else list(ids) for ids in prompt_ids]
    batches = [right_padded(kept[start : start + batch_size], pad_id) for start in range(0, len(kept), batch_size)]
    wanted = [runner.hidden_state_index(number) for number in ([layer] if isinstance(layer, int) else layer)]
    if not wanted:
        raise MergewiseError("no hidden state number given")
    pooled: dict[int, torch.Tensor] = {}

    def keep(number: int, states: list[torch.Tensor]) -> None:
        if number in wanted:
            parts = []
            for hidden, batch in zip(states, batches):
                assert batch.attention_mask is not None  # right_padded's batches carry one
                parts.append(mean_pooled(hidden, batch.attention_mask))
            pooled[number] = torch.cat(parts)

    with fast_half_matmuls(runner.model, runner.device):
        runner.run(batches, through=max(wanted), observe=keep, desc="hidden states (layers)", quiet=quiet)
    return torch.cat([pooled[number] for number in wanted], -1)


HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def native_half_matmuls(dtype: torch.dtype) -> bool:
    """Whether this CPU has matmul instructions for `dtype` (AVX-512 BF16 for bf16; AVX-512 FP16 or
    AMX-FP16 for fp16, as torch's probes tell), so that torch's half-precision matmuls outrun float32
    ones instead of trailing them several times."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.cpu._is_avx512_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch build without these probes
        pass
    return False


@contextmanager
def fast_half_matmuls(model: nn.Module, device: torch.device) -> Iterator[None]:
    """On a CPU without instructions for their dtype (`native_half_matmuls`), the half-precision
    Linear layers of `model` multiply in float32 and round their outputs to their dtype: what a
    half-precision matmul computes (it sums in float32 too), at float32's speed: a 59-token prefill of
    a 135 M model took 0.7 s instead of 2.5 s on a CPU without bf16 instructions. Elsewhere (an
    accelerator, a CPU with those instructions) the model's own matmuls run: on a CPU with AVX-512
    BF16 that prefill took 0.12-0.14 s natively and 0.22 s in float32. Both sum the same exact
    products, in another order, so features agree across machines to that rounding; on one machine
    they are always computed the same way. One weight is upcast at a time. A Linear that already
    carries a `forward` of its own (another library's hook) keeps it, untouched."""
    if device.type != "cpu":
        yield
        return
    linears = [
        module
        for module in model.modules()
        if type(module) is nn.Linear
        and module.weight.dtype in HALF_DTYPES
        and not native_half_matmuls(module.weight.dtype)
        and "forward" not in vars(module)
    ]
    for module in linears:
        module.forward = functools.partial(_float32_linear, module)  # type: ignore[method-assign]  # undone below
    try:
        yield
    finally:
        for module in linears:
            del module.forward


def _float32_linear(module: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.float()
    return F.linear(inputs.float(), module.weight.float(), bias).to(module.weight.dtype)


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). Each
    layer's activations come in other sizes than the last one's, and the holes they leave in the heap
    otherwise added up layer after layer: +17 MB per layer of a 0.9 B model over 72 prompts, without
    end. It changes no allocator setting; the next layer faults its pages in again."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean hidden state over its real tokens, float32 on the CPU."""
    weights = attention_mask.to(hidden.device)[..., None].float()
    return ((hidden.float() * weights).sum(1) / weights.sum(1)).cpu()


def right_padded(prompts: list[list[int]], pad_id: int) -> Batch:
    """Prompts as one batch padded on the right, so that each one's tokens sit at positions 0.."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask)


def _model_skeleton(
    config: PretrainedConfig, dtype: torch.dtype, device: torch.device, trust_remote_code: bool
) -> PreTrainedModel:
    """The model with its parameters on the meta device (no memory: the layers are loaded one at a
    time) and its buffers on `device`. Buffers (rotary frequencies, embedding scales) are computed,
    not stored in checkpoints: the model's own initialisation fills them, as in `from_pretrained`."""
    with torch.device("meta"):
        model = causal_lm_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, buffer in list(model.named_buffers()):
        owner_name, _, leaf = name.rpartition(".")
        model.get_submodule(owner_name)._buffers[leaf] = torch.empty_like(buffer, device=device)
    model.initialize_weights()
    return model.eval()


def _decoder_layers(model: nn.Module, depth: int, folder: ModelFolder) -> tuple[str, nn.ModuleList]:
    """The decoder's block list, found generically: the ModuleList of `depth` modules."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return name, module
    raise MergewiseError(
        f"{folder.path}: no list of {depth} decoder layers found; it cannot be run layer "
        "by layer, use the in-memory pass"
    )


class _PassThrough(nn.Module):
    """Stands in for a decoder layer the stem's run must get past without running it."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


@contextmanager
def _passing_through(layers: nn.ModuleList, count: int) -> Iterator[None]:
    """The first `count` layers replaced by pass-throughs, put back afterwards."""
    kept = [layers[index] for index in range(count)]
    try:
        for index in range(count):
            layers[index] = _PassThrough()
        yield
    finally:
        for index, layer in enumerate(kept):
            layers[index] = layer


def _beside(model: nn.Module, target: nn.Module, keep: nn.Module | None) -> list[str]:
    """Names of the modules beside the way from `model` down to `target` (but `keep`): a multimodal
    model's vision tower and projector beside its language model, which text never reaches."""
    target_name = _module_name(model, target)
    parts = target_name.split(".") if target_name else []
    ancestors = [".".join(parts[:depth]) for depth in range(len(parts))]
    names = []
    for ancestor in ancestors:
        for child_name, child in model.get_submodule(ancestor).named_children():
            name = f"{ancestor}.{child_name}" if ancestor else child_name
            if name not in ancestors and child is not target and child is not keep:
                names.append(name)
    return names


def _hidden(output) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns them alone or first in a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _set_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    module.get_submodule(owner_name)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
