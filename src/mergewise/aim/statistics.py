"""AIM's calibration: per-module input-channel activation statistics of the base model.

For every module with a weight that is not an embedding, the module's input x is hooked and reduced
over tokens per input channel (mean |x| by default), then summed over calibration blocks. The result
is a safetensors file, one vector per module keyed by the module's weight name, reusable by every
merge of that base.

Two passes give the same numbers: the whole model in memory, or `stream_layers`, which captures the
first decoder layer's inputs and then loads one decoder layer at a time from the checkpoint, so peak
memory is one layer plus the calibration hidden states, whatever the depth.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from mergewise.aim.data import (
    DOCUMENT_CONVENTIONS,
    SAMPLED_CONVENTIONS,
    blocks_from_documents,
    hub_documents,
    read_documents,
    self_generated_blocks,
)
from mergewise.checkpoint import ModelFolder
from mergewise.checkpoint.files import parse_json, validated
from mergewise.checkpoint.lora import AdaptedFolder
from mergewise.checkpoint.pretrained import load_config_and_tokenizer, load_pretrained
from mergewise.checkpoint.writer import writing
from mergewise.devices import resolve_device
from mergewise.errors import MergewiseError
from mergewise.layerwise import Batch, LayerwiseModel
from mergewise.structure import CheckpointLayout, causal_lm_class

FINGERPRINT_WINDOWS = 16
FINGERPRINT_WINDOW_BYTES = 4096


class CalibrationSettings(BaseModel):
    """What decides the statistics (recorded in the file's metadata); the `aim:` block's
    `calibration:` and `mergewise calibrate` both validate through it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    data: str = "self"
    samples: int = Field(256, ge=1)
    seq_len: int = Field(512, ge=2)
    statistic: Literal["mean_abs", "rms", "max"] = "mean_abs"
    seed: int = 0

    @field_validator("data")
    @classmethod
    def _names_data(cls, data: str) -> str:
        if not data.removeprefix("hf:").strip():
            raise ValueError(f"{data!r} names no data (use a text/JSONL file, a folder, 'self' or 'hf:NAME')")
        return data


class ChannelStatistics:
    """One running vector per module: the per-block reduction of its input over tokens, combined
    over blocks (summed; maximum for `max`). Accumulated in float64 so block order hardly matters."""

    def __init__(self, statistic: str):
        self.statistic = statistic
        self.vectors: dict[str, torch.Tensor] = {}

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        values = inputs.detach().float().reshape(-1, inputs.shape[-1])
        if self.statistic == "mean_abs":
            block = values.abs().mean(0)
        elif self.statistic == "rms":
            block = values.square().mean(0).sqrt()
        else:
            block = values.abs().amax(0)
        block = block.double().cpu()
        if name not in self.vectors:
            self.vectors[name] = block
        elif self.statistic == "max":
            self.vectors[name] = torch.maximum(self.vectors[name], block)
        else:
            self.vectors[name] += block


@dataclass(frozen=True)
class CalibrationStats:
    """A loaded statistics file: vectors by weight name, and how they were made."""

    vectors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def input_axis(self, name: str) -> int:
        """The weight axis that runs over input channels: last, except for GPT-2's Conv1D (first)."""
        return json.loads(self.metadata.get("input_axis", "{}")).get(name, -1)


def target_modules(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """Weight name → (module, input axis of its weight) for every non-embedding module with a weight."""
    targets = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or isinstance(module, nn.Embedding):
            continue
        axis = 0 if isinstance(module, Conv1D) else -1
        targets[f"{name}.weight" if name else "weight"] = (module, axis)
    return targets


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → mixture-of-experts module whose experts transformers fuses into 3-D tensors:
    `gate_up_proj` (experts, 2·inner, hidden) and `down_proj` (experts, hidden, inner), a gated
    activation `act_fn`, no biases; called with the tokens' hidden states and their chosen experts.
    Other expert layouts are left unmeasured (their weights are then merged without relaxation)."""
    found = {}
    for name, module in model.named_modules():
        gate_up, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
        if (
            gate_up is not None
            and down is not None
            and gate_up.dim() == down.dim() == 3
            and gate_up.shape[0] == down.shape[0]
            and gate_up.shape[1] == 2 * down.shape[2]
            and gate_up.shape[2] == down.shape[1]
            and hasattr(module, "act_fn")
            and not any(key.endswith("_bias") for key in module._parameters)
        ):
            found[name] = module
    return found


def expert_key(parameter: str, expert: int) -> str:
    """The recorder's name for one expert's slice of a fused expert parameter."""
    return f"{parameter}#{expert}"


def _observe_experts(recorder: ChannelStatistics, name: str, module: nn.Module, hidden: torch.Tensor, chosen) -> None:
    """Each expert's inputs: the hidden states of the tokens routed to it (its gate and up
    projections' input), and its gated activation (its down projection's input)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    chosen = chosen.reshape(hidden.shape[0], -1)
    gate_up: torch.Tensor = module.get_parameter("gate_up_proj")
    activation: Callable[[torch.Tensor], torch.Tensor] = module.act_fn  # type: ignore[assignment]
    for expert in range(gate_up.shape[0]):
        routed = hidden[(chosen == expert).any(dim=-1)]
        if routed.shape[0] == 0:
            continue
        recorder.observe(expert_key(f"{name}.gate_up_proj", expert), routed)
        gate, up = F.linear(routed, gate_up[expert]).chunk(2, dim=-1)
        recorder.observe(expert_key(f"{name}.down_proj", expert), activation(gate) * up)


@contextmanager
def recording(
    targets: dict[str, tuple[nn.Module, int]], recorder: ChannelStatistics, experts: dict[str, nn.Module] | None = None
) -> Iterator[None]:
    """Forward pre-hooks that hand each target module's input, and each expert's inputs, to
    `recorder` while active."""

    def hook_for(name: str):
        def hook(module, args, kwargs):
            recorder.observe(name, args[0] if args else next(iter(kwargs.values())))

        return hook

    def expert_hook_for(name: str):
        def hook(module, args, kwargs):
            arguments = [*args, *kwargs.values()]
            _observe_experts(recorder, name, module, arguments[0], arguments[1])

        return hook

    handles = [
        module.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, (module, _) in targets.items()
    ]
    handles += [
        module.register_forward_pre_hook(expert_hook_for(name), with_kwargs=True)
        for name, module in (experts or {}).items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------ the command
def calibrate(
    base_dir: str | Path | ModelFolder,
    stats_path: str | Path,
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    device: str = "cpu",
    stream_layers: bool = False,
    quiet: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Compute the base model's statistics and save them (atomically) to `stats_path`, which must not
    exist unless `overwrite`; the folder's own Python runs only if `trust_remote_code`. `base_dir` may
    be a located folder, so that a recipe's `base+adapter` is measured with its adapter merged in."""
    folder = base_dir if isinstance(base_dir, ModelFolder) else ModelFolder(base_dir)
    stats_path = Path(stats_path).expanduser().resolve()
    data = Path(settings.data).expanduser().resolve()
    local_data = [data] if settings.data != "self" and not settings.data.startswith("hf:") and data.exists() else []
    _check_stats_location(stats_path, [*folder.folders, *local_data], overwrite)
    target_device = resolve_device(device)
    recorder = ChannelStatistics(settings.statistic)
    config, tokenizer = load_config_and_tokenizer(folder.path, trust_remote_code=trust_remote_code)
    model: PreTrainedModel | None
    if settings.data == "self":
        model = _load_model(folder, config, target_device, trust_remote_code)
        blocks = self_generated_blocks(model, tokenizer, settings.samples, settings.seq_len, settings.seed)
        conventions = SAMPLED_CONVENTIONS
    else:  # tokenized before the model loads, so that bad data fails fast
        blocks = blocks_from_documents(
            _documents(settings), tokenizer, settings.samples, settings.seq_len, settings.data
        )
        conventions = DOCUMENT_CONVENTIONS
        model = None if stream_layers else _load_model(folder, config, target_device, trust_remote_code)
    with torch.inference_mode():
        if stream_layers:
            model = None  # only the sampler needed it; the streamed pass never holds the whole model
            input_axes = _streamed_statistics(folder, config, blocks, recorder, target_device, quiet, trust_remote_code)
        else:
            assert model is not None  # loaded above unless the layers stream
            targets = target_modules(model)
            input_axes = {name: axis for name, (_, axis) in targets.items()}
            with recording(targets, recorder, expert_modules(model)):
                for block in tqdm(blocks, desc="calibrate (blocks)", disable=quiet):
                    model(input_ids=block.to(target_device), use_cache=False)
            input_axes = _as_stored(recorder, input_axes, CheckpointLayout(model, folder))
    metadata = {
        **{key: str(value) for key, value in settings.model_dump().items()},
        **conventions,
        "base": folder.label,
        "base_fingerprint": base_fingerprint(folder),
        "blocks": str(len(blocks)),
        "tokens": str(sum(block.numel() for block in blocks)),
        "input_axis": json.dumps({name: axis for name, axis in input_axes.items() if axis != -1}),
        "pass": "stream_layers" if stream_layers else "in_memory",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _save(stats_path, {name: vector.float() for name, vector in recorder.vectors.items()}, metadata)
    return stats_path


def _load_model(folder: ModelFolder, config, device: torch.device, trust_remote_code: bool) -> PreTrainedModel:
    """The whole base model in float32 (safetensors only: nothing is unpickled)."""
    try:
        model: PreTrainedModel = load_pretrained(
            causal_lm_class(config).from_pretrained,
            folder.path,
            trust_remote_code=trust_remote_code,
            config=config,
            dtype=torch.float32,
            use_safetensors=True,
        )
    except (OSError, ValueError) as error:
        raise MergewiseError(f"{folder.path}: cannot load the model ({str(error).splitlines()[0]})") from None
    if isinstance(folder, AdaptedFolder):  # the weights as the folder reads them: its LoRA merged in
        names = sorted({target.parameter for target in folder.adapter.targets.values()})
        with torch.no_grad():
            for name, tensor in zip(names, CheckpointLayout(model, folder).read(names, folder.read_together)):
                model.get_parameter(name).copy_(tensor)
    model.to(device).eval()  # type: ignore[arg-type]  # in place; transformers' decorated `to` hides its signature
    return model


def _documents(settings: CalibrationSettings) -> Iterable[str | None]:
    if settings.data.startswith("hf:"):
        return hub_documents(settings.data.removeprefix("hf:"))
    return read_documents(settings.data, settings.seq_len)


def _check_stats_location(path: Path, inputs: list[Path], overwrite: bool) -> None:
    """The statistics file may be no input and lie in none (`mergewise calibrate base
    base/model.safetensors` would replace the weights it measures); an existing file is replaced only
    with `overwrite`."""
    for source in inputs:
        if path == source or source in path.parents:
            raise MergewiseError(f"statistics file {path} would be written into input {source}; choose another path")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise MergewiseError(f"statistics path {path} exists and is not a file")
        if not overwrite:
            raise MergewiseError(f"statistics file {path} already exists (use --overwrite to replace it)")


# ----------------------------------------------------------------------------- the layer-streamed pass
def _streamed_statistics(
    folder: ModelFolder,
    config,
    blocks: list[torch.Tensor],
    recorder: ChannelStatistics,
    device: torch.device,
    quiet: bool,
    trust_remote_code: bool,
) -> dict[str, int]:
    """The hooks record every module as the layer-by-layer pass runs it; the head never runs, its
    input is the final norm's output."""
    streamed = LayerwiseModel(folder, config, dtype=torch.float32, device=device, trust_remote_code=trust_remote_code)
    targets = target_modules(streamed.model)
    head_name = next(name for name, (module, _) in targets.items() if module is streamed.head)
    with recording(targets, recorder, expert_modules(streamed.model)):
        final = streamed.run([Batch(block) for block in blocks], desc="calibrate (layers)", quiet=quiet)
    for states in final:
        recorder.observe(head_name, states)
    return _as_stored(recorder, {name: axis for name, (_, axis) in targets.items()}, streamed.layout)


def _as_stored(recorder: ChannelStatistics, input_axes: dict[str, int], layout: CheckpointLayout) -> dict[str, int]:
    """The vectors (and input axes) renamed from the modules' weights to the checkpoint tensors they
    are stored as, which a merge reads (a Mixtral router is `mlp.gate` in the model, `block_sparse_moe.gate`
    in its checkpoint). An expert's vectors go to each of its own matrices where the checkpoint stores
    one per expert, or make one row each of a (experts, channels) matrix where it stores the fused
    3-D tensor (zeros for an expert no token reached: nothing of it is pulled back)."""
    renamed = {name: layout.stored_name(name) or name for name in input_axes}
    vectors: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    for name, vector in recorder.vectors.items():
        parameter, marker, index = name.partition("#")
        if marker:
            per_expert.setdefault(parameter, {})[int(index)] = vector
        else:
            vectors[renamed.get(name, name)] = vector
    for parameter, by_expert in per_expert.items():
        fused = layout.stored_name(parameter)
        if fused is not None:
            count = len(layout.model.get_parameter(parameter))
            width = next(iter(by_expert.values())).shape[0]
            matrix = torch.zeros(count, width, dtype=torch.float64)
            for expert, vector in by_expert.items():
                matrix[expert] = vector
            vectors[fused] = matrix
            continue
        for expert, stored_names in enumerate(layout.expert_parts(parameter)):
            for stored in stored_names:
                if expert in by_expert:
                    vectors[stored] = by_expert[expert]
    recorder.vectors = vectors
    return {renamed[name]: axis for name, axis in input_axes.items()}


# ------------------------------------------------------------------------------------ the file
def base_fingerprint(folder: ModelFolder) -> str:
    """Identifies a base model cheaply: config, tensor headers, and a few sampled windows of each
    weight file (so a fine-tune with the same architecture gets a different fingerprint)."""
    digest = hashlib.sha256(json.dumps(folder.config, sort_keys=True).encode())
    if isinstance(folder, AdaptedFolder):  # a base with a LoRA adapter is another base
        for key, factors in sorted(folder.adapter.factors.items()):
            digest.update(folder.adapter.targets[key].parameter.encode())
            for factor in factors:
                digest.update(factor.numpy().tobytes())
    for name in sorted(folder.tensors):
        info = folder.tensors[name]
        digest.update(f"{name}:{list(info.shape)}:{info.dtype}".encode())
    for file in sorted({info.file for info in folder.tensors.values()}):
        size = file.stat().st_size
        with open(file, "rb") as handle:
            for window in range(FINGERPRINT_WINDOWS):
                handle.seek(size * window // FINGERPRINT_WINDOWS)
                digest.update(handle.read(FINGERPRINT_WINDOW_BYTES))
    return digest.hexdigest()[:32]


def _save(path: Path, vectors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        with writing(path):
            save_file(vectors, partial, metadata=metadata)
            os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def load_statistics(path: str | Path) -> CalibrationStats:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MergewiseError(f"statistics file not found: {path} (make one with `mergewise calibrate`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            vectors = {name: handle.get_tensor(name).float() for name in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError) as error:
        raise MergewiseError(f"{path}: not a readable safetensors statistics file ({error})") from None
    if "base_fingerprint" not in metadata:
        raise MergewiseError(f"{path}: no base_fingerprint in its metadata (not made by `mergewise calibrate`?)")
    for name, vector in vectors.items():  # a matrix: one vector per expert of a fused expert tensor
        if vector.dim() not in (1, 2) or not bool(torch.isfinite(vector).all()):
            raise MergewiseError(f"{path}: statistics vector {name} is not a vector (or matrix) of finite values")
    validated(
        dict[str, Literal[0, -1]],
        parse_json(metadata.get("input_axis", "{}"), f"{path}: input_axis"),
        f"{path}: input_axis",
    )  # as `input_axis` reads it
    return CalibrationStats(vectors, metadata)
