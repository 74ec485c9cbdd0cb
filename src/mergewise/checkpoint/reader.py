"""Lazy, read-only access to the weights of a Hugging Face model folder.

Only headers are read up front; tensor data is read on demand, a row range at a time, so a merge
never holds a whole model. Pickle checkpoints (`.bin`) need an explicit opt-in because unpickling
runs arbitrary code; even then they are loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergewise.checkpoint.files import inside_folder, read_json, validated
from mergewise.errors import MergewiseError

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # config.json's names for the depth
PICKLE_INDEX = "pytorch_model.bin.index.json"

SAFETENSORS_DTYPES = {  # the header's dtype names; the writer uses the same table
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


READ_TOGETHER_GAP = 1 << 16  # bytes of other tensors `read_together` reads through rather than read twice


@contextmanager
def _opened(file: Path) -> Iterator[int]:
    """A descriptor for one read or one mapping (a mapping keeps its own): however many shards the
    inputs have, only the reads under way hold files open."""
    descriptor = os.open(file, os.O_RDONLY)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


Count = Annotated[int, Field(strict=True, ge=0)]


class TextConfig(BaseModel):
    """The fields of config.json (or of its `text_config`, a multimodal model's language model) that
    mergewise reads, each of the type transformers gives it; the rest is kept as it is."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    num_hidden_layers: Count | None = None
    n_layer: Count | None = None
    num_layers: Count | None = None
    n_layers: Count | None = None
    layer_types: list[Annotated[str, Field(strict=True)]] | None = None
    vocab_size: Count | None = None
    hidden_size: Count | None = None
    n_embd: Count | None = None
    tie_word_embeddings: Annotated[bool, Field(strict=True)] | None = None

    @property
    def depth(self) -> int | None:
        """The decoder depth, whatever the architecture calls it."""
        return next((value for key in DEPTH_KEYS if (value := getattr(self, key)) is not None), None)

    @model_validator(mode="after")
    def _one_type_per_layer(self) -> TextConfig:
        if self.layer_types is not None and self.depth is not None and len(self.layer_types) != self.depth:
            raise ValueError(
                f"layer_types lists {len(self.layer_types)} layers, but the model has {self.depth} "
                "(transformers refuses such a config)"
            )
        return self


class ModelConfig(TextConfig):
    model_type: Annotated[str, Field(strict=True)] | None = None
    # an object when given, null refused (the output's config is written into it)
    text_config: TextConfig = None  # type: ignore[assignment]

    @property
    def text(self) -> TextConfig:
        return self.text_config or self


class WeightIndex(BaseModel):
    """model.safetensors.index.json: which shard file holds each tensor."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    weight_map: dict[str, Annotated[str, Field(strict=True)]]


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: enough to plan a merge without reading data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0  # absolute byte offset of the data (safetensors files)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class PendingWeights(Protocol):
    """Weight files a folder is planned from before they are on disk (a Hub model's, whose headers
    were read over the network): a merge is planned, and fails, before anything large downloads."""

    @property
    def nbytes(self) -> int:
        """What `download` will fetch."""
        ...

    def tensors(self) -> dict[str, TensorInfo]:
        """The tensors as the files' headers describe them, where the files will be."""
        ...

    def download(self) -> None: ...


class ModelFolder:
    """A local model folder: its `config.json` and a name → file index of its weights (read from the
    files' headers, or from `pending` weights until `fetch_weights` brings them)."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False, pending: PendingWeights | None = None):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise MergewiseError(f"model folder not found: {path}")
        self.config, self.declared = self._read_config()
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._runs: dict[tuple[str, ...], list[list[TensorInfo]]] = {}  # see `read_together`
        self._allow_pickle = allow_pickle
        self.reference = str(self.path)  # how a recipe named it (a path, or a Hub id)
        self.pending = pending
        self.tensors: dict[str, TensorInfo] = pending.tensors() if pending is not None else self._index_weights()

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    # ----------------------------------------------------------------------------------- setup
    def _inside(self, file: Path, what: str) -> Path:
        return inside_folder(file, self.path, what)

    def _read_config(self) -> tuple[dict, ModelConfig]:
        """config.json as it is (it is written out again) and its fields that mergewise reads, checked
        (NaN and infinity may stand in the others)."""
        config_path = self.path / "config.json"
        if not (config_path.exists() or config_path.is_symlink()):
            raise MergewiseError(f"{config_path}: missing (not a Hugging Face model folder?)")
        config = read_json(config_path, "config.json", folder=self.path, finite=False)
        if not isinstance(config, dict):
            raise MergewiseError(f"{config_path}: not a JSON object")
        return config, validated(ModelConfig, config, str(config_path))

    def _index_weights(self) -> dict[str, TensorInfo]:
        files = self._safetensors_files()
        if files:
            return self._read_safetensors_headers(files)
        pickle_files = self._pickle_files()
        if pickle_files:
            if not self._allow_pickle:
                raise MergewiseError(
                    f"{self.path}: weights are pickle files ({pickle_files[0].name}); loading them "
                    "can run arbitrary code, pass --allow-pickle (allow_pickle=True) to accept"
                )
            return self._read_pickles(pickle_files)
        raise MergewiseError(f"{self.path}: no *.safetensors (or pytorch_model*.bin) weights found")

    def _safetensors_files(self) -> list[Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file() or index.is_symlink():
            return self._files_from_index(self._inside(index, "weight index"))
        single = self.path / "model.safetensors"
        if single.is_file() or single.is_symlink():
            return [self._inside(single, "weights file")]
        return [self._inside(file, "weights file") for file in sorted(self.path.glob("*.safetensors"))]

    def _pickle_files(self) -> list[Path]:
        index = self.path / PICKLE_INDEX
        if index.is_file() or index.is_symlink():
            return self._files_from_index(self._inside(index, "weight index"))
        return [self._inside(file, "weights file") for file in sorted(self.path.glob("pytorch_model*.bin"))]

    def _files_from_index(self, index: Path) -> list[Path]:
        weight_map = read_json(index, "weight index", folder=self.path, schema=WeightIndex).weight_map
        files = []
        for name in dict.fromkeys(weight_map.values()):
            file = self.path / name
            if not (file.is_file() or file.is_symlink()):
                raise MergewiseError(f"{index}: lists shard {name}, which is missing")
            files.append(self._inside(file, f"shard {name!r} listed in {index.name}"))
        return files

    def _read_safetensors_headers(self, files: list[Path]) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for info in read_safetensors_header(file):
                tensors[info.name] = info
        return tensors

    def _read_pickles(self, files: list[Path]) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # torch raises many types for a bad pickle
                raise MergewiseError(f"{file}: cannot be read as a weights-only checkpoint ({error})") from None
            self._pickled[file] = state
            for name, tensor in state.items():
                tensors[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, file)
        return tensors

    def fetch_weights(self) -> None:
        """Download the pending weights this folder was planned from; their headers on disk must be
        the ones planned with."""
        if self.pending is None:
            return
        self.pending.download()
        self.pending = None
        if self._index_weights() != self.tensors:
            raise MergewiseError(
                f"{self.reference}: the downloaded weights are not the ones their headers described when "
                "the merge was planned"
            )

    def _downloaded(self) -> None:
        if self.pending is not None:
            raise MergewiseError(f"{self.reference}: weights read before they were downloaded (fetch_weights first)")

    def source_files(self) -> list[Path]:
        """The files the weights are read from (what decides them)."""
        return sorted({info.file for info in self.tensors.values()})

    @property
    def folders(self) -> list[Path]:
        """The folders the model is read from (an adapter's too): no output may touch them."""
        return [self.path]

    @property
    def label(self) -> str:
        """The model as messages about its values name it."""
        return str(self.path)

    @property
    def name(self) -> str:
        """The model as short messages name it: its Hub id as the recipe gave it, else its folder's name."""
        return self.reference if revision_of(self.path) else self.path.name

    # ------------------------------------------------------------------------------------ reads
    def read(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`, or only its rows `rows` (first axis), copied from disk now into memory
        of its own (no file descriptor or mapping stays attached to it), or into `out`: CPU memory of
        the same dtype and number of elements, contiguous."""
        self._downloaded()
        info = self.tensors[name]
        if info.file in self._pickled:
            tensor = self._pickled[info.file][name]
            tensor = tensor if rows is None or tensor.dim() == 0 else tensor[rows]
            return tensor.clone() if out is None else out.copy_(tensor.reshape(out.shape))
        return read_rows(info, rows, out)

    def read_together(self, names: Sequence[str]) -> list[torch.Tensor]:
        """The whole tensors `names`, copied from disk now: tensors that lie close together in a
        safetensors file (a decoder layer's) come in one read into one buffer, as views of it, instead
        of one read each. The grouping is worked out once per list of names."""
        self._downloaded()
        key = tuple(names)
        if key not in self._runs:
            self._runs[key] = _runs(
                [info for info in map(self.tensors.__getitem__, names) if info.file not in self._pickled]
            )
        tensors = {name: self.read(name) for name in names if self.tensors[name].file in self._pickled}
        for run in self._runs[key]:
            start = run[0].offset
            span = read_rows(
                TensorInfo(run[0].name, (run[-1].offset + run[-1].nbytes - start,), torch.uint8, run[0].file, start)
            )
            for info in run:
                part = span[info.offset - start : info.offset - start + info.nbytes]
                tensors[info.name] = part.view(info.dtype).view(info.shape)
        return [tensors[name] for name in names]

    def stored(self, name: str) -> TensorInfo | None:
        """Where the tensor `name` lies in a safetensors file, when a read returns exactly those bytes
        (None for a pickled tensor): it can then be copied file to file."""
        self._downloaded()
        info = self.tensors[name]
        return info if info.file.suffix == ".safetensors" else None

    def map_rows(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Like `read`, but the rows are mapped from the page cache instead of copied into fresh
        memory. The mapping is private: a write to the tensor copies the page and never reaches the
        file. It holds a file descriptor until the tensor is freed, so it is meant for short-lived
        row chunks."""
        self._downloaded()
        info = self.tensors[name]
        if info.file in self._pickled:
            return self.read(name, rows)
        return map_rows(info, rows)

    def close(self) -> None:
        """Drop the tensors of loaded pickle files (no file stays open between reads)."""
        self._pickled.clear()

    @property
    def num_layers(self) -> int | None:
        """Decoder depth from config.json, whatever the architecture calls it."""
        return self.declared.text.depth

    @property
    def stored_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the checkpoint's values: the precision it was saved in,
        which a few tensors kept in float32 (as some checkpoints keep norms) do not change."""
        counts: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes // info.dtype.itemsize
        if not counts:
            raise MergewiseError(f"{self.path}: the checkpoint holds no floating-point tensor")
        return max(counts, key=counts.__getitem__)

    @property
    def tied_embeddings(self) -> bool:
        """Whether lm_head shares the input embedding (HF's default is tied)."""
        return bool(self.config.get("tie_word_embeddings", True))


def revision_of(folder: Path) -> str | None:
    """The commit a cached snapshot folder holds (`…/models--org--name/snapshots/<commit>`)."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.name
    return None


def _extent(info: TensorInfo, rows: slice | None) -> tuple[int, int, tuple[int, ...]]:
    """(absolute byte offset, byte length, shape) of the rows `rows` of a safetensors tensor."""
    if rows is None or not info.shape:
        first, stop = 0, info.shape[0] if info.shape else 1
    else:
        first, stop = rows.indices(info.shape[0])[:2]
    row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
    count = max(0, stop - first)
    shape = (count, *info.shape[1:]) if info.shape else ()
    return info.offset + first * row_bytes, count * row_bytes, shape


def _runs(infos: list[TensorInfo]) -> list[list[TensorInfo]]:
    """Safetensors tensors in runs that one read each can bring: same file, at most READ_TOGETHER_GAP
    bytes apart, each one's view of the run's buffer starting at a whole element."""
    runs: list[list[TensorInfo]] = []
    for info in sorted(infos, key=lambda info: (str(info.file), info.offset, info.nbytes)):
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and last.file == info.file
            and 0 <= info.offset - (last.offset + last.nbytes) <= READ_TOGETHER_GAP
            and (info.offset - runs[-1][0].offset) % info.dtype.itemsize == 0
        ):
            runs[-1].append(info)
        else:
            runs.append([info])
    return runs


def read_rows(info: TensorInfo, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """A safetensors tensor, or only its rows `rows` (first axis), copied from disk now into memory
    of its own (the file's pages stay in the page cache, outside the process), or straight into
    `out` (contiguous CPU memory of the same dtype and number of elements, returned as it is)."""
    start, length, shape = _extent(info, rows)
    if out is not None:
        if not (
            out.device.type == "cpu"
            and out.dtype == info.dtype
            and out.is_contiguous()
            and out.numel() * out.element_size() == length
        ):
            raise ValueError(
                f"{info.name}: cannot read {list(shape)} {info.dtype} into {list(out.shape)} "
                f"{out.dtype} on {out.device}"
            )
    else:  # not zero-filled first: every byte is read
        out = torch.empty(shape, dtype=info.dtype)
    buffer = out.view(-1).view(torch.uint8).numpy().data if length else memoryview(bytearray())
    with _opened(info.file) as descriptor:
        done = 0
        while done < len(buffer):
            chunk = os.preadv(descriptor, [buffer[done:]], start + done)
            if chunk <= 0:
                raise MergewiseError(f"{info.file}: truncated while reading tensor {info.name}")
            done += chunk
    return out


def map_rows(info: TensorInfo, rows: slice | None = None) -> torch.Tensor:
    """A safetensors tensor, or its rows `rows`, mapped from the page cache (privately: a write copies
    the page and never reaches the file); the mapping keeps its own descriptor until it is freed."""
    start, length, shape = _extent(info, rows)
    if length == 0:
        return torch.empty(shape, dtype=info.dtype)
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    with _opened(info.file) as descriptor:
        try:
            mapped = mmap.mmap(
                descriptor,
                length + start - aligned,
                offset=aligned,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except ValueError:  # the file is shorter than its header said (changed since it was read)
            raise MergewiseError(f"{info.file}: truncated while reading tensor {info.name}") from None
    return torch.frombuffer(
        mapped, dtype=info.dtype, offset=start - aligned, count=length // info.dtype.itemsize
    ).reshape(shape)


def read_safetensors_header(file: Path) -> list[TensorInfo]:
    """The tensors a local safetensors file holds, from its header (see `parse_safetensors_header`)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:

        def read(offset: int, length: int) -> bytes:
            handle.seek(offset)
            return handle.read(length)

        return parse_safetensors_header(file, size, read)


def parse_safetensors_header(
    file: Path, size: int, read: Callable[[int, int], bytes], label: str | None = None
) -> list[TensorInfo]:
    """Parse and check a safetensors header as strictly as the format's own library: a JSON object of
    unique entries, integer non-negative shapes, known dtypes, extents that match the shapes and tile
    the data exactly (no overlap, no gap, nothing past the end), string metadata. A corrupt or
    crafted file is rejected, naming it, before any merge work starts. `read(offset, length)` gives
    the file's bytes (from disk, or from a Hub file not downloaded yet: `label` then names it);
    `size` is the file's length."""
    label = label or str(file)
    prefix = read(0, 8)
    if len(prefix) < 8:
        raise MergewiseError(f"{label}: corrupt safetensors file (shorter than its header)")
    (header_length,) = struct.unpack("<Q", prefix)
    if header_length > min(size - 8, 100_000_000):
        raise MergewiseError(f"{label}: corrupt safetensors header (declared length {header_length})")
    try:
        header = json.loads(read(8, header_length), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise MergewiseError(f"{label}: corrupt safetensors header ({str(error)[:200]})") from None
    if not isinstance(header, dict):
        raise MergewiseError(f"{label}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise MergewiseError(f"{label}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + header_length
    tensors = []
    extents = []
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape, offsets = entry["shape"], entry["data_offsets"]
            if not (
                isinstance(shape, list)
                and all(_is_count(size) for size in shape)
                and isinstance(offsets, list)
                and len(offsets) == 2
                and all(_is_count(value) for value in offsets)
            ):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise MergewiseError(f"{label}: corrupt safetensors header entry for tensor {name}") from None
        if math.prod(max(size, 1) for size in shape) >= 2**63:  # torch's strides must fit 64 bits
            raise MergewiseError(
                f"{label}: corrupt safetensors header: tensor {name} has shape {shape}, which no tensor can have"
            )
        begin, end = offsets
        info = TensorInfo(name, tuple(shape), dtype, file, data_start + begin)
        if end - begin != info.nbytes:
            raise MergewiseError(
                f"{label}: corrupt safetensors header: tensor {name} has {end - begin} bytes of "
                f"data for shape {shape} (truncated or crafted file?)"
            )
        tensors.append(info)
        extents.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(extents):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise MergewiseError(f"{label}: corrupt safetensors header: tensor {name} {problem}")
        position = end
    if data_start + position != size:
        raise MergewiseError(
            f"{label}: corrupt safetensors file: the header describes {position} bytes of data, "
            f"the file holds {size - data_start} (truncated download?)"
        )
    return tensors


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicated = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate entry {duplicated!r}")
    return dict(pairs)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
