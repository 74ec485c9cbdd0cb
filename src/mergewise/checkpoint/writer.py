"""Sharded safetensors output written as a stream.

The merge plan knows every output tensor's name, shape and dtype before any data exists, so each
shard's header is written first and tensor rows are written in place as they are produced: no shard
is ever buffered in memory, whatever `shard_size` is.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mergewise.checkpoint.reader import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, TensorInfo
from mergewise.errors import MergewiseError

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '1.5GiB' or a byte count → bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise MergewiseError(f"shard size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise MergewiseError(f"shard size {text!r} must be positive")
    return size


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """A write that fails (a full disk, a file size limit, a read-only folder) as one error naming
    the file: the OSError of a write or a flush names none."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or str(error).removeprefix("Error while serializing: ")
        raise MergewiseError(f"{path}: cannot write ({reason})") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, its failures named as `writing` names them."""
    with writing(path):
        save_file(tensors, path, metadata=metadata)


def write_text(path: Path, text: str) -> None:
    """A small UTF-8 file (a record, a config), its failures named as `writing` names them."""
    with writing(path):
        path.write_text(text, encoding="utf-8")


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Slot:
    file: Path
    offset: int  # absolute byte offset of the tensor's data in its file
    row_bytes: int
    tensor: PlannedTensor


class StreamingShardWriter:
    """Lays tensors out into shards of at most `shard_size` bytes and accepts their rows in any order."""

    def __init__(
        self,
        folder: Path,
        tensors: list[PlannedTensor],
        shard_size: int,
        metadata: dict[str, str] | None = None,
        file_stem: str = "model",
        keep: frozenset[str] = frozenset(),
    ):
        """`keep`: shard files already complete in `folder` (a resumed merge), left as they are."""
        self.folder = folder
        self._slots: dict[str, _Slot] = {}
        shards = _assign_shards(tensors, shard_size)
        self.weight_map: dict[str, str] = {}
        for index, shard in enumerate(shards, start=1):
            file_name = (
                f"{file_stem}.safetensors"
                if len(shards) == 1
                else f"{file_stem}-{index:05d}-of-{len(shards):05d}.safetensors"
            )
            self._write_header(folder / file_name, shard, metadata or {}, file_name not in keep)
            for tensor in shard:
                self.weight_map[tensor.name] = file_name
        self.shards: dict[str, list[str]] = {}
        for name, file_name in self.weight_map.items():
            self.shards.setdefault(file_name, []).append(name)
        self.total_size = sum(tensor.nbytes for tensor in tensors)
        self.single_file = len(shards) == 1

    def _write_header(self, path: Path, shard: list[PlannedTensor], metadata: dict[str, str], create: bool) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
        start = 0
        for tensor in shard:
            header[tensor.name] = {
                "dtype": _DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [start, start + tensor.nbytes],
            }
            start += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data must start 8-byte aligned
        data_start = 8 + len(encoded)
        if create:
            with writing(path), open(path, "wb") as handle:
                handle.write(struct.pack("<Q", len(encoded)))
                handle.write(encoded)
                handle.truncate(data_start + start)
        for tensor in shard:
            row_bytes = tensor.nbytes // tensor.shape[0] if tensor.shape and tensor.shape[0] else 0
            self._slots[tensor.name] = _Slot(path, data_start, row_bytes, tensor)
            data_start += tensor.nbytes

    def write(self, name: str, data: torch.Tensor, first_row: int = 0) -> None:
        """Write `data` (rows starting at `first_row`, already in the planned dtype) into place."""
        self.write_at(name, data, first_row * self._slots[name].row_bytes)

    def write_at(self, name: str, data: torch.Tensor, start: int) -> None:
        """Write `data` (in the planned dtype) into `name`'s bytes from byte `start` on. Each write
        opens its shard for itself, so however many shards there are, few files are open."""
        slot = self._slots[name]
        view = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
        self._check_span(slot, start, len(view))
        offset = slot.offset + start
        with writing(slot.file):
            descriptor = os.open(slot.file, os.O_WRONLY)
            try:
                while view:
                    written = os.pwrite(descriptor, view, offset)
                    view, offset = view[written:], offset + written
                _start_writeback(descriptor, slot.offset + start, offset - slot.offset - start)
            finally:
                os.close(descriptor)

    def copy_stored(self, name: str, start: int, source: TensorInfo) -> None:
        """Copy a tensor's bytes as stored in a safetensors file (`source`, in the planned dtype) into
        `name`'s bytes from byte `start` on, file to file inside the kernel: nothing passes through
        this process, and a file system that shares blocks (XFS, Btrfs) copies none."""
        slot = self._slots[name]
        if source.dtype != slot.tensor.dtype:
            raise MergewiseError(
                f"{source.file}: tensor {source.name} is {source.dtype}, {name} is {slot.tensor.dtype}"
            )
        self._check_span(slot, start, source.nbytes)
        with writing(slot.file), open(source.file, "rb") as reading:
            descriptor = os.open(slot.file, os.O_WRONLY)
            try:
                what = f"{source.file}: tensor {source.name}"
                _copy_range(reading.fileno(), source.offset, descriptor, slot.offset + start, source.nbytes, what)
                _start_writeback(descriptor, slot.offset + start, source.nbytes)
            finally:
                os.close(descriptor)

    def planned(self, name: str) -> PlannedTensor:
        return self._slots[name].tensor

    @staticmethod
    def _check_span(slot: _Slot, start: int, length: int) -> None:
        if start < 0 or start + length > slot.tensor.nbytes:
            raise MergewiseError(
                f"tensor {slot.tensor.name}: {length} bytes from byte {start} do not fit its {slot.tensor.nbytes}"
            )

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A tensor as written so far, or the rows `rows` of its first dimension, read back from its
        shard (a copy)."""
        slot = self._slots[name]
        shape = tuple(slot.tensor.shape)
        offset, count = slot.offset, slot.tensor.nbytes
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = slot.tensor.nbytes // shape[0] if shape[0] else 0
            shape = (max(stop - start, 0), *shape[1:])
            offset, count = slot.offset + start * row_bytes, shape[0] * row_bytes
        if count == 0:
            return torch.empty(shape, dtype=slot.tensor.dtype)
        data = np.fromfile(slot.file, dtype=np.uint8, count=count, offset=offset)
        return torch.from_numpy(data).view(slot.tensor.dtype).reshape(shape)

    def close(self) -> None:
        """When there are several shards, write the Hugging Face index."""
        if not self.single_file:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            write_text(self.folder / SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")


_SYNC_FILE_RANGE_WRITE = 2
# copy_file_range cannot copy between these files (another file system, an old kernel, a special
# file): the bytes go through this process instead
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF)
_COPY_CHUNK = 64 << 20


def _copy_range(source: int, source_offset: int, target: int, target_offset: int, length: int, what: str) -> None:
    """`length` bytes of one open file into another, at the given offsets (`what`: the source, as an
    error names it)."""
    while length:
        try:
            copied = os.copy_file_range(source, target, length, source_offset, target_offset)
        except OSError as error:
            if error.errno not in _NO_KERNEL_COPY:
                raise
            copied = 0
            chunk = os.pread(source, min(length, _COPY_CHUNK), source_offset)
            while copied < len(chunk):
                copied += os.pwrite(target, memoryview(chunk)[copied:], target_offset + copied)
        if copied == 0:
            raise MergewiseError(f"{what}: the file ends {length} bytes early")
        source_offset, target_offset, length = source_offset + copied, target_offset + copied, length - copied


@functools.cache
def _sync_file_range() -> Callable | None:
    """Linux's sync_file_range from the C library (None elsewhere)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


def _start_writeback(descriptor: int, offset: int, length: int) -> None:
    """Start writing these bytes to disk now, without waiting: the output is flushed before it is
    moved into place, and that flush then finds little left to write (on a 0.4 GB output it took
    ~0.3 s of a merge's wall time otherwise). Where the call is missing it is skipped."""
    function = _sync_file_range()
    if function is not None and length:
        function(descriptor, offset, length, _SYNC_FILE_RANGE_WRITE)


def _assign_shards(tensors: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """Greedy, in plan order: a tensor larger than a shard gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for tensor in tensors:
        if shards[-1] and used + tensor.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return shards
