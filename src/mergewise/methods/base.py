"""What a merge method is: a pure function of tensor rows, whose keyword signature is its schema.

A method gets the same row range of every input (float32) and returns those rows of the output, so
the engine can stream big tensors in row chunks. Methods whose rows depend on whole-tensor figures
(a magnitude threshold, a norm, an angle) declare a `prepare` function: it reads the tensor once,
chunk by chunk, and its result reaches every row call as `rows.stats`.
"""

from __future__ import annotations

import inspect
import math
import typing
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any

import torch

# Parameters that are shares of a tensor's entries: outside [0, 1] they mean nothing (mergekit clamps).
SHARES = frozenset({"density", "gamma", "epsilon", "select_topk"})


class PerModelMarker:
    """Annotation marker: the parameter takes one value per input model."""


PerModel = Annotated[Sequence[float], PerModelMarker]
OptionalPerModel = Annotated[Sequence[float | None], PerModelMarker]


class BasePolicy(StrEnum):
    REQUIRED = "required"  # base is the reference the inputs are differences from
    OPTIONAL = "optional"  # used when given
    INPUT = "input"  # base is one more weighted input (linear)
    UNUSED = "unused"


@dataclass
class TensorRows:
    """The same rows [first_row, first_row + n) of the base and every input, in the working dtype
    (the recipe's `dtype`, as in mergekit); methods upcast where their arithmetic needs it."""

    base: torch.Tensor | None
    inputs: list[torch.Tensor]
    first_row: int = 0
    stats: Any = None
    rng: Callable[[int], torch.Generator] | None = None  # generator for input i, fixed per row chunk
    non_finite: bool | None = None  # set by a merge that counted NaN/infinity in its own output


def chunk_generator(seed: int, tensor: str, index: int, first_row: int) -> torch.Generator:
    """`TensorRows.rng` of input `index` in the row chunk of `tensor` starting at `first_row`: fixed by
    (seed, tensor, input, chunk), so a merge is reproducible and a method's `prepare` pass draws what
    its merge pass draws."""
    key = zlib.crc32(f"{seed}/{tensor}/{index}/{first_row}".encode())
    return torch.Generator().manual_seed(((seed << 32) ^ key) & (2**63 - 1))


def close_workspace(workspace: dict[str, Any]) -> None:
    """Release what methods kept in a merge's workspace (worker threads, scratch memory) and empty it."""
    for value in workspace.values():
        if hasattr(value, "close"):
            value.close()
    workspace.clear()


class ChunkedTensors:
    """Whole-tensor view for `prepare`: iterate the tensor's row chunks as `TensorRows`.

    `workspace` holds what a `prepare` may keep for the next tensor of the same merge (scratch
    memory, worker threads): the engine passes one per merge and, when the merge ends, closes every
    value that has a `close` method."""

    def __init__(
        self,
        shape: tuple[int, ...],
        chunk_iterator: Callable[[list[int] | None], Iterator[TensorRows]],
        workspace: dict[str, Any] | None = None,
    ):
        self.shape = shape
        self._chunk_iterator = chunk_iterator
        self.workspace = workspace if workspace is not None else {}

    @property
    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total

    def chunks(self, models: list[int] | None = None) -> Iterator[TensorRows]:
        """Row chunks of the base and of the inputs `models` (all by default), in order."""
        return self._chunk_iterator(models)


REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Parameter:
    name: str  # as written in the config (`lambda`, not `lambda_`)
    argument: str  # keyword of the Python function
    kind: type  # float, bool or int
    per_model: bool
    default: Any  # REQUIRED when the config must give it
    optional: bool = False  # None is an accepted value

    def coerce(self, value: Any) -> Any:
        """Cast a YAML scalar to this parameter's type, rejecting what cannot be meant."""
        if value is None and self.optional:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError(f"expected true/false, got {value!r}")
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        if self.name in SHARES and not 0 <= number <= 1:
            raise ValueError(f"a share of entries lies in [0, 1], got {value!r}")
        return self.kind(number) if self.kind is int else number


@dataclass(frozen=True)
class WorkingMemory:
    """What a merge holds beyond the process itself, for `merge --dry-run`'s peak-memory estimate:
    `fixed_mib` MiB (row chunks in flight, loaded kernels) and `per_entry` bytes per entry of the
    merge's largest tensor (whole-tensor selections, norms and scratch kept from tensor to tensor).
    Measured for merges of three bf16 models by `benchmarks/memory_estimate.py`, which also checks
    the estimate on a model shape the figures were not taken from."""

    fixed_mib: float = 70.0
    per_entry: float = 0.0

    def bytes(self, largest_tensor: int) -> int:
        return round(self.fixed_mib * 2**20 + self.per_entry * largest_tensor)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge_rows: Callable[..., torch.Tensor]
    base: BasePolicy
    min_inputs: int = 1  # models other than the base
    # With the base alone (a slice of only the base), the output is the base, as mergekit makes it.
    base_alone_is_base: bool = False
    max_inputs: int | None = None
    prepare: Callable[..., Any] | None = None
    uses_randomness: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)  # keywords bound by a preset
    defaults: dict[str, Any] = field(default_factory=dict)  # preset defaults overriding the signature
    whole_tensor: Callable[[dict[str, Any]], bool] = lambda shared: False  # rows not independent
    # A faster, bit-identical `merge_rows` for the rows it accepts (it returns None for the others).
    fused: Callable[..., torch.Tensor | None] | None = None
    # Loading `fused` costs a fixed ~0.7 s per process; merges producing fewer parameters than this
    # finish sooner without it.
    fused_min_parameters: int = 0
    # Starts loading `fused` in the background and returns at once, so that the first tensors need
    # not take the slower path while it loads.
    load_fused: Callable[[], Any] | None = None
    description: str = ""
    # mergekit 0.1.5 promotes this method's results to float32 and writes them so whatever the
    # recipe's dtype; mergewise writes the dtype asked for, and says so when the two differ.
    mergekit_writes_float32: bool = False
    working_memory: WorkingMemory = WorkingMemory()

    @cached_property
    def parameters(self) -> dict[str, Parameter]:
        """The config-facing schema, read from the row function's keyword-only arguments."""
        hints = typing.get_type_hints(self.merge_rows, include_extras=True)
        schema = {}
        for argument, spec in inspect.signature(self.merge_rows).parameters.items():
            if spec.kind is not inspect.Parameter.KEYWORD_ONLY or argument in self.fixed:
                continue
            hint = hints.get(argument, float)
            per_model = typing.get_origin(hint) is Annotated and PerModelMarker in hint.__metadata__
            optional = hint is OptionalPerModel
            kind = float if per_model else _scalar_type(hint)
            name = argument.rstrip("_")
            default = self.defaults.get(name, spec.default)
            schema[name] = Parameter(name, argument, kind, per_model, default, optional)
        return schema

    def merge(
        self, rows: TensorRows, params: dict[str, Any], implementation: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Merge `rows`; `implementation` is `merge_rows` itself or a compiled version of it."""
        return (implementation or self.merge_rows)(rows, **self._arguments(self.merge_rows, params))

    def run_prepare(self, tensors: ChunkedTensors, params: dict[str, Any]) -> Any:
        assert self.prepare is not None  # called for methods with a prepare pass only
        return self.prepare(tensors, **self._arguments(self.prepare, params))

    def _arguments(self, function: Callable, params: dict[str, Any]) -> dict[str, Any]:
        accepted = inspect.signature(function).parameters
        by_argument = {self.parameters[name].argument: value for name, value in params.items()}
        by_argument.update(self.fixed)
        return {key: value for key, value in by_argument.items() if key in accepted}


def _scalar_type(hint: Any) -> type:
    for candidate in (bool, int, float):
        if hint is candidate:
            return candidate
    return float


def combine_chunk_sums(parts: list[torch.Tensor]) -> torch.Tensor:
    """A whole-tensor sum from per-chunk sums, each computed by torch in the working dtype: one chunk
    gives exactly torch's whole-tensor result; several are added in float64 and rounded once."""
    if len(parts) == 1:
        return parts[0].cpu()
    return torch.stack([part.cpu().double() for part in parts]).sum().to(parts[0].dtype)


def combine_chunk_norms(parts: list[torch.Tensor]) -> torch.Tensor:
    """A whole-tensor L2 norm from per-chunk norms, like `combine_chunk_sums`."""
    if len(parts) == 1:
        return parts[0].cpu()
    return torch.stack([part.cpu().double() for part in parts]).norm().to(parts[0].dtype)
