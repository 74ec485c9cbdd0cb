"""The streaming executor: plan → map row chunks (one chunk ahead, on a thread) → method → write
(on a thread).

Peak memory is a few row chunks of every input (whole tensors for the one method whose rows are not
independent, row-wise nuslerp): it depends on the widest tensor, never on the model's depth.
"""

from __future__ import annotations

import functools
import math
import random
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from tqdm.auto import tqdm

from mergewise.chat_templates import read_tokenizer_config, resolve_chat_template, write_chat_template
from mergewise.checkpoint import (
    Journal,
    PlannedTensor,
    StreamingShardWriter,
    check_output_location,
    copy_tokenizer,
    parse_size,
    staged_folder,
    write_model_config,
)
from mergewise.checkpoint.record import merge_fingerprint, write_merge_record
from mergewise.chunking import row_ranges
from mergewise.config import MergeConfig, Recipe, load_recipe
from mergewise.devices import resolve_device
from mergewise.errors import MergewiseError
from mergewise.methods import ChunkedTensors, TensorRows
from mergewise.methods.base import chunk_generator, close_workspace
from mergewise.model_card import write_model_card
from mergewise.options import MergeOptions
from mergewise.plan import MergePlan, TensorJob, TensorSource, build_plan
from mergewise.stages import Stage, StageContext, block_spec, recipe_stages

P = ParamSpec("P")
T = TypeVar("T")

# Whole-tensor statistics (magnitude selections) are asked for up to this many parameters ahead of
# the tensor being merged; they hold a bit per entry and input.
PREPARED_AHEAD_ELEMENTS = 1 << 25
# Compiling costs seconds per process; measured on a 0.2 B-parameter merge (2 cores) it cost more
# than it saved, so by default it is used from this many output parameters on.
COMPILE_MIN_PARAMETERS = 2_000_000_000


class CompileFallbackWarning(RuntimeWarning):
    """The fused kernels could not be built here; the merge continues in eager mode."""


class NonFiniteWarning(RuntimeWarning):
    """A merged tensor holds NaN or infinity: one of its inputs does (or the arithmetic overflowed)."""


@dataclass(frozen=True)
class MergeResult:
    """A finished merge: the output folder (a path-like) and each recipe block's result by name."""

    out_dir: Path
    records: dict[str, Any]

    def __fspath__(self) -> str:
        return str(self.out_dir)


def run_merge(
    recipe_source: str | Path | dict | MergeConfig | Recipe, out_dir: str | Path, **options: Any
) -> MergeResult:
    """Merge the models a recipe describes into the Hugging Face folder `out_dir`, running the stages
    of its blocks (`aim:`, `mediator:`) inside the same streaming pass."""
    merge_options = MergeOptions(**options)
    recipe, plan = plan_recipe(recipe_source, strict=merge_options.strict, allow_pickle=merge_options.allow_pickle)
    return execute_plan(plan, out_dir, merge_options, stages=recipe_stages(recipe), recipe=recipe)


def plan_recipe(
    recipe_source: str | Path | dict | MergeConfig | Recipe,
    *,
    strict: bool = False,
    allow_pickle: bool = False,
    download: bool = True,
) -> tuple[Recipe, MergePlan]:
    """A recipe and its plan, from headers alone: every error a recipe can hold but a bad tensor. Hub
    weights are downloaded after planning, unless `download` is false."""
    recipe = load_recipe(recipe_source, strict=strict)
    plan = build_plan(
        recipe.config,
        recipe.config_dir,
        allow_pickle=allow_pickle,
        base_model=recipe.base_model,
        strict=strict,
        download=download,
    )
    return recipe, plan


def execute_plan(
    plan: MergePlan,
    out_dir: str | Path,
    options: MergeOptions,
    *,
    stages: Sequence[Stage] = (),
    recipe: Recipe | None = None,
) -> MergeResult:
    """Merge `plan` into `out_dir` with the stages of the recipe's blocks. Torch's thread count is the
    caller's, unless `options.threads` sets it for the merge (torch has one count per process, so two
    merges running at once in one process should leave it to their caller)."""
    if options.threads is not None and options.threads < 1:
        raise MergewiseError(f"--threads: must be at least 1, got {options.threads}")
    out_dir = Path(out_dir).expanduser().resolve()
    protected = [Path(recipe.origin)] if recipe is not None and Path(recipe.origin).is_file() else []
    inputs = [
        *(folder for model in plan.models for folder in model.folders),
        *(path.resolve() for stage in stages for path in stage.inputs()),
    ]
    check_output_location(out_dir, inputs, options.overwrite, protected)
    device = resolve_device(options.device)
    shard_size = parse_size(options.shard_size)
    chat_template = (
        resolve_chat_template(plan.config.chat_template, [model.path for model in plan.models], strict=options.strict)
        if plan.config.chat_template
        else None
    )
    if chat_template is not None and plan.vocabulary is None:
        read_tokenizer_config(plan.tokenizer_source.path)  # the template goes into its copy
    _check_stages(plan, options, stages)
    fingerprint = _fingerprint(plan, recipe, shard_size)
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        with (
            staged_folder(out_dir, options.overwrite, fingerprint if options.resume else None) as staging,
            ThreadPoolExecutor(1, thread_name_prefix="mergewise-read") as reader,
            ThreadPoolExecutor(1, thread_name_prefix="mergewise-write") as write_thread,
        ):
            recorded = Journal.resumed(staging) if options.resume else None
            seed, finished = _resumed_seed(options, recorded)
            context = StageContext(plan, device, staging, shard_size, options.quiet, options.chunk_elements)
            for stage in stages:
                stage.on_plan(context)
            _merge_tensors(
                plan, staging, options, stages, seed, device, shard_size, reader, write_thread, fingerprint, finished
            )
            write_model_config(
                staging,
                plan.reference.config,
                _config_dtype(plan),
                plan.source_layers,
                plan.vocabulary.rows if plan.vocabulary is not None else None,
            )
            if plan.vocabulary is None:
                copy_tokenizer(plan.tokenizer_source.path, staging)
            else:
                plan.vocabulary.save(staging)
            if chat_template is not None:
                write_chat_template(staging, chat_template)
            records = {stage.name: stage.finalize(staging) for stage in stages}
            models = {model.reference: model.path for model in plan.models}
            write_merge_record(staging, _recipe_record(plan, recipe), models, seed, options.device, records)
            if options.model_card:
                write_model_card(staging, out_dir.name, plan, _recipe_record(plan, recipe))
    finally:
        for stage in stages:
            stage.close()
        torch.set_num_threads(threads)  # the caller's, also after numba's first parallel launch reset OpenMP's
        for model in plan.models:
            model.close()
    return MergeResult(out_dir, records)


def _check_stages(plan: MergePlan, options: MergeOptions, stages: Sequence[Stage]) -> None:
    """Refuse what a recipe block's spec says its stage does not support."""
    reindexed = any(
        source.vocabulary is not None for job in plan.jobs for source in (*job.inputs, job.base) if source is not None
    )
    refusing = [stage.name for stage in stages if not block_spec(stage.name).reindexed_vocabulary]
    if reindexed and refusing:
        names = ", ".join(f"{name}:" for name in refusing)
        raise MergewiseError(
            f"tokenizer: re-indexing embedding rows into a new vocabulary cannot be combined with "
            f"{names} yet (its stage reads the inputs' rows as stored); merge models of one "
            "vocabulary, or leave out tokenizer_source / tokenizer"
        )
    unresumable = [stage.name for stage in stages if not block_spec(stage.name).resumable]
    if options.resume and unresumable:
        names = ", ".join(f"{name}:" for name in unresumable)
        raise MergewiseError(f"--resume: a recipe with {names} cannot be resumed yet; build it again")


def _resumed_seed(options: MergeOptions, recorded: tuple[int, dict[str, str]] | None) -> tuple[int, dict[str, str]]:
    """The merge's seed and the shards already finished: a resumed merge keeps the recorded seed,
    so its random masks are the ones the finished shards were made with."""
    if recorded is None:
        seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
        return seed, {}
    seed, finished = recorded
    if options.seed is not None and options.seed != seed:
        raise MergewiseError(f"--resume: the staged merge used --seed {seed}, not {options.seed}")
    return seed, finished


def _fingerprint(plan: MergePlan, recipe: Recipe | None, shard_size: int) -> str:
    files = [file for model in plan.models for file in model.source_files()]
    return merge_fingerprint(_recipe_record(plan, recipe), files, _planned_tensors(plan), shard_size)


def _planned_tensors(plan: MergePlan) -> list[PlannedTensor]:
    return [PlannedTensor(job.name, job.shape, job.out_dtype) for job in plan.jobs]


def _merge_tensors(
    plan: MergePlan,
    staging: Path,
    options: MergeOptions,
    stages: Sequence[Stage],
    seed: int,
    device: torch.device,
    shard_size: int,
    reader: ThreadPoolExecutor,
    write_thread: ThreadPoolExecutor,
    fingerprint: str,
    finished: dict[str, str],
) -> None:
    writer = StreamingShardWriter(
        staging, _planned_tensors(plan), shard_size, metadata={"merged_by": "mergewise"}, keep=frozenset(finished)
    )
    journal = Journal(staging, fingerprint, seed, writer.shards, finished)
    jobs = [job for job in plan.jobs if writer.weight_map[job.name] not in finished]
    total = sum(math.prod(job.shape) for job in plan.jobs)
    compile_kernels = options.compile if options.compile is not None else total >= COMPILE_MIN_PARAMETERS
    fused = plan.method.fused if total >= plan.method.fused_min_parameters else None
    if fused is not None and plan.method.load_fused is not None and jobs:
        plan.method.load_fused()
    executor = _JobExecutor(plan, device, seed, reader, stages, compile_kernels, fused, options)
    try:
        background = _BackgroundWrites(writer, write_thread)
        with (
            tqdm(
                total=total, unit="param", unit_scale=True, desc=f"merge ({plan.method.name})", disable=options.quiet
            ) as progress,
            ThreadPoolExecutor(1, thread_name_prefix="mergewise-prepare") as preparing,
        ):
            progress.update(total - sum(math.prod(job.shape) for job in jobs))  # finished before a resume
            for job, statistics in _prepared_ahead(jobs, lambda job: executor.prepare(job, preparing)):
                progress.set_postfix_str(job.name, refresh=False)
                executor.run(job, statistics, background)
                background.after(journal.tensor_written, job.name)
                progress.update(math.prod(job.shape))
        background.drain()
        writer.close()
    finally:
        executor.close()


def _prepared_ahead(
    jobs: list[TensorJob], prepare: Callable[[TensorJob], Future | None], ahead_elements: int = PREPARED_AHEAD_ELEMENTS
) -> Iterator[tuple[TensorJob, Future | None]]:
    """Each job with its whole-tensor statistics, asked for ahead: while one tensor merges, those of
    the tensors after it are gathered, up to `ahead_elements` of them (a selection queues behind the
    ones before it, so a single small tensor ahead would leave workers idle behind a large one)."""
    ahead: deque[tuple[TensorJob, Future | None]] = deque()
    upcoming = iter(jobs)
    queued = 0
    for _ in jobs:
        if not ahead:
            first = next(upcoming)
            ahead.append((first, prepare(first)))
            queued += math.prod(first.shape)
        current = ahead.popleft()
        queued -= math.prod(current[0].shape)
        while queued < ahead_elements and (following := next(upcoming, None)) is not None:
            ahead.append((following, prepare(following)))
            queued += math.prod(following.shape)
        yield current


class _BackgroundWrites:
    """Hands merged row chunks to a writer thread, so the disk write of one chunk overlaps the
    arithmetic of the next; at most `depth` chunks wait, so memory stays bounded."""

    def __init__(self, writer: StreamingShardWriter, thread: ThreadPoolExecutor, depth: int = 2):
        self._writer = writer
        self._thread = thread
        self._depth = depth
        self._pending: deque[Future] = deque()

    def write(self, name: str, data: torch.Tensor, first_row: int = 0) -> None:
        if len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._thread.submit(self._writer.write, name, data, first_row))

    def drain(self) -> None:
        """Wait for every pending write (raising the first failure)."""
        while self._pending:
            self._pending.popleft().result()

    def after(self, callback: Callable[..., object], *arguments: Any) -> None:
        """Run `callback` on the writer thread once every write submitted before it is done."""
        if len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._thread.submit(callback, *arguments))

    def read_back(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A tensor as written (or some of its rows), once its pending rows are on file."""
        self.drain()
        return self._writer.read(name, rows)


class _JobExecutor:
    """Runs one TensorJob at a time, reading its row chunks one step ahead of the arithmetic."""

    def __init__(
        self,
        plan: MergePlan,
        device: torch.device,
        seed: int,
        reader: ThreadPoolExecutor,
        stages: Sequence[Stage],
        compile_kernels: bool,
        fused: Callable | None,
        options: MergeOptions,
    ):
        self.plan = plan
        self.strict = options.strict
        self.chunk_elements = options.chunk_elements
        self.compile_min_elements = options.compile_min_elements
        self.method = plan.method
        self.device = device
        self.seed = seed
        self.reader = reader
        self.stages = stages
        self.workspace: dict[str, Any] = {}  # methods' scratch memory, kept from tensor to tensor
        self.fused = fused
        # Random methods draw from explicit generators, which compiled graphs do not take.
        self.compiled = (
            _compiled(self.method.merge_rows) if compile_kernels and not self.method.uses_randomness else None
        )

    def close(self) -> None:
        """Release what the methods kept in the workspace (worker threads, scratch memory)."""
        close_workspace(self.workspace)

    def prepare(self, job: TensorJob, thread: ThreadPoolExecutor) -> Future | None:
        """The method's whole-tensor statistics of `job`, computed on `thread` (None: it has none)."""
        if self.method.prepare is None or not job.out_dtype.is_floating_point or not job.inputs:
            return None
        ranges = self._ranges(job)
        tensors = ChunkedTensors(job.shape, lambda models: self._chunks(job, ranges, models), self.workspace)
        return thread.submit(self._guard, job, lambda: self.method.run_prepare(tensors, job.params))

    def run(self, job: TensorJob, statistics: Future | None, writer: _BackgroundWrites) -> None:
        if not job.out_dtype.is_floating_point:
            source = job.base or job.inputs[0]
            writer.write(job.name, source.model.read(source.name))
            return
        self._merge_job(job, statistics.result() if statistics is not None else None, writer)
        for stage in self.stages:
            if stage.wants_tensor(job):
                stage.on_tensor(job, functools.partial(writer.read_back, job.name))

    def _ranges(self, job: TensorJob) -> list[slice]:
        return row_ranges(job.shape, whole=self.method.whole_tensor(job.params), chunk_elements=self.chunk_elements)

    def _merge_job(self, job: TensorJob, stats: Any, writer: _BackgroundWrites) -> None:
        params = job.params
        ranges = self._ranges(job)
        reported = False
        for rows_in, rows in zip(self._chunks(job, ranges), ranges):
            rows_in.stats = stats
            merged = self._guard(job, self._merge, rows_in, params)
            if not reported and (rows_in.non_finite if rows_in.non_finite is not None else _holds_non_finite(merged)):
                self._report_non_finite(job, rows_in)
                reported = True
            for stage in self.stages:
                merged = stage.on_rows(job, rows_in, merged)
            writer.write(job.name, merged.to(job.out_dtype), rows.start or 0)

    def _report_non_finite(self, job: TensorJob, rows: TensorRows) -> None:
        """Name the tensor and the inputs holding NaN or infinity (checked only once an output has
        some, so a clean merge pays one pass over its output)."""
        sources = [*([job.base] if job.base is not None else []), *job.inputs]
        tensors = [*([rows.base] if rows.base is not None else []), *rows.inputs]
        culprits = [
            source.model.label for source, tensor in zip(sources, tensors) if not bool(torch.isfinite(tensor).all())
        ]
        cause = f"NaN or infinity in {', '.join(culprits)}" if culprits else "the arithmetic overflowed"
        message = f"tensor {job.name}: the merged values hold NaN or infinity ({cause})"
        if self.strict:
            raise MergewiseError(message)
        warnings.warn(message + "; --strict makes this an error", NonFiniteWarning, stacklevel=2)

    def _merge(self, rows: TensorRows, params: dict) -> torch.Tensor:
        if not rows.inputs:  # the base alone (methods with `base_alone_is_base`)
            assert rows.base is not None  # the planner gives a job no inputs only when it has a base
            return rows.base
        if self.fused is not None:
            merged = self.method.merge(rows, params, self.fused)
            if merged is not None:
                return merged
        if self.compiled is not None and rows.inputs[0].numel() >= self.compile_min_elements:
            try:
                return self.method.merge(rows, params, self.compiled)
            except ValueError:
                raise
            except Exception as error:  # no C++ compiler, unsupported platform, …: stay correct
                warnings.warn(
                    f"torch.compile unavailable ({type(error).__name__}); merging without it",
                    CompileFallbackWarning,
                    stacklevel=2,
                )
                self.compiled = None
        return self.method.merge(rows, params)

    def _guard(self, job: TensorJob, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`work(*args, **kwargs)`, with a ValueError it raises named after the tensor."""
        try:
            return work(*args, **kwargs)
        except ValueError as error:
            raise MergewiseError(f"tensor {job.name}: {error}") from None

    def _chunks(self, job: TensorJob, ranges: list[slice], models: list[int] | None = None) -> Iterator[TensorRows]:
        """TensorRows per row range, each read on the reader thread while the previous one computes."""
        chosen = range(len(job.inputs)) if models is None else models
        pending: Future | None = None
        for index, rows in enumerate(ranges):
            current = pending or self.reader.submit(self._read, job, rows, chosen)
            pending = (
                self.reader.submit(self._read, job, ranges[index + 1], chosen) if index + 1 < len(ranges) else None
            )
            yield current.result()

    def _read(self, job: TensorJob, rows: slice, chosen: Sequence[int]) -> TensorRows:
        base = self._load(job.base, rows) if job.base is not None else None
        inputs = [self._load(job.inputs[index], rows) for index in chosen]
        first_row = rows.start or 0
        return TensorRows(
            base, inputs, first_row, rng=lambda index: chunk_generator(self.seed, job.name, index, first_row)
        )

    def _load(self, source: TensorSource, rows: slice) -> torch.Tensor:
        """Rows in the working dtype: the recipe's `dtype`, else as stored (mergekit's rule); each
        method decides where it needs more precision."""
        tensor = source.map_rows(rows)
        return tensor.to(self.device, self.plan.compute_dtype or tensor.dtype)


def _holds_non_finite(values: torch.Tensor) -> bool:
    """NaN or infinity anywhere in `values`: a float32 sum carries them (one fast reduction; an
    elementwise test costs a third of a plain merge), and the rare non-finite sum is confirmed."""
    if not values.is_floating_point() or math.isfinite(float(values.sum(dtype=torch.float32))):
        return False
    return not bool(torch.isfinite(values).all())


@functools.cache
def _compiled(function: Callable) -> Callable:
    """One compiled kernel per method for every shape; intermediate roundings are kept as in eager
    mode so that the fused result is bit-identical to the plain one."""
    return torch.compile(function, dynamic=True, options={"emulate_precision_casts": True})


def _config_dtype(plan: MergePlan) -> torch.dtype:
    floating = [job.out_dtype for job in plan.jobs if job.out_dtype.is_floating_point]
    return max(set(floating), key=floating.count) if floating else torch.float32


def _recipe_record(plan: MergePlan, recipe: Recipe | None) -> dict:
    return recipe.record() if recipe is not None else plan.config.model_dump(mode="json", exclude_none=True)
