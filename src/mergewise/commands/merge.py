"""`mergewise merge CONFIG.yml OUT_DIR`: run a merge recipe."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from mergewise.errors import MergewiseError
from mergewise.options import MergeOptions

if TYPE_CHECKING:
    import torch

    from mergewise.plan import MergePlan, TensorJob, TensorSource


def add_merge_options(parser: argparse.ArgumentParser) -> None:
    """Flags of every command that runs a merge, one per field of `MergeOptions` that declares one."""
    for option in MergeOptions.flags():
        flag, kind, text = f"--{option.name.replace('_', '-')}", option.metadata["kind"], option.metadata["help"]
        if kind is not bool:
            parser.add_argument(flag, type=kind, default=option.default, help=text)
        elif option.default is None:  # undecided unless asked: --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif option.default:
            parser.add_argument(f"--no-{flag[2:]}", dest=option.name, action="store_false", help=text)
        else:
            parser.add_argument(flag, action="store_true", help=text)


def merge_options(args: argparse.Namespace) -> dict:
    """The `MergeOptions` of the command line; its merges use every core unless --threads says."""
    options = {option.name: getattr(args, option.name) for option in MergeOptions.flags()}
    return options | {"threads": args.threads if args.threads is not None else os.cpu_count() or 1}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge models as a YAML recipe describes",
        description="Merge models as a mergekit-compatible YAML recipe describes.",
    )
    parser.add_argument("config", help="merge recipe (YAML)")
    parser.add_argument("out_dir", nargs="?", help="output model folder (created; must not exist unless --overwrite)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate and plan the recipe from the models' headers (a Hub model's read over the network), "
        "print what the merge would read and write and any warnings, and stop (no weights read or "
        "downloaded, nothing written)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="as --check, and list every output tensor with its shape, dtype and sources",
    )
    add_merge_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from mergewise.engine import run_merge

    if args.check or args.dry_run:
        check(args)
        return
    if args.out_dir is None:
        raise MergewiseError("merge: give OUT_DIR, the folder to write the merged model to (or --check)")
    result = run_merge(args.config, args.out_dir, **merge_options(args))
    if not args.quiet:
        print(f"merged model written to {result.out_dir}")


def check(args: argparse.Namespace) -> None:
    """Load and plan the recipe as a merge would, from headers only, and say what the merge would
    read, download and write (and, with --dry-run, every tensor)."""
    from mergewise.config import load_recipe
    from mergewise.engine import plan_recipe

    recipe = load_recipe(args.config, strict=args.strict)
    _, plan = plan_recipe(recipe, strict=args.strict, allow_pickle=args.allow_pickle, download=False)
    try:
        parameters = sum(math.prod(job.shape) for job in plan.jobs)
        dtypes = Counter(_dtype_name(job.out_dtype) for job in plan.jobs)
        inputs = len({source.model.path for job in plan.jobs for source in job.inputs})
        base = f" onto base {plan.base_model.reference}" if plan.base_model is not None else ""
        layers = len(plan.source_layers) if plan.source_layers is not None else plan.reference.num_layers
        print(
            f"{args.config}: {plan.method.name} of {inputs} model(s){base}: {len(plan.jobs)} tensors, "
            f"{parameters:,} parameters ({', '.join(f'{count} {dtype}' for dtype, count in dtypes.most_common())}), "
            f"{layers} layers"
        )
        read = {
            (source.model.path, source.name): source.model.tensors[source.name].nbytes
            for job in plan.jobs
            for source in (*job.inputs, job.base)
            if source is not None
        }
        written = sum(math.prod(job.shape) * job.out_dtype.itemsize for job in plan.jobs)
        remote = {model.reference: model.pending.nbytes for model in plan.models if model.pending is not None}
        download = (
            f" ({_size(sum(remote.values()))} to download from the Hub first: {', '.join(remote)})" if remote else ""
        )
        folders = len(plan.models)
        print(f"  reads {_size(sum(read.values()))} from {folders} model folder(s){download}, writes {_size(written)}")
        print(_peak_memory_line(plan, bool(recipe.blocks)))
        for stage in recipe.blocks:
            print(f"  with the {stage}: block (its own work runs in the merge)")
        if args.dry_run:
            for job in plan.jobs:
                print(f"  {job.name} {list(job.shape)} {_dtype_name(job.out_dtype)} <- {_sources(job)}")
    finally:
        for model in plan.models:
            model.close()


def _peak_memory_line(plan: MergePlan, has_blocks: bool) -> str:
    """The merge's peak memory, estimated as this process's own (Python, torch and the plan, as the
    merge's process holds them before it reads a weight) plus the method's working memory."""
    working = plan.working_memory()
    blocks = "; recipe blocks' own work not counted" if has_blocks else ""
    process = _resident_bytes()
    if process is None:
        return f"  peak memory: {_size(working)} beyond the process itself (estimate{blocks})"
    return (
        f"  peak memory about {_size(process + working)} (estimate: {_size(process)} for the process, "
        f"{_size(working)} for {plan.method.name}'s working memory{blocks})"
    )


def _resident_bytes() -> int | None:
    """This process's resident memory now: Linux's VmRSS (its peak, ru_maxrss, would count the memory
    of the process it was started from), elsewhere the peak so far; None where neither is known."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _sources(job: TensorJob) -> str:
    """A job's inputs as the recipe names their models (and the tensor, where it has another name)."""

    def named(source: TensorSource) -> str:
        return source.model.reference + (f"[{source.name}]" if source.name != job.name else "")

    base = f"; base {named(job.base)}" if job.base is not None else ""
    return ", ".join(named(source) for source in job.inputs) + base


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _size(nbytes: int) -> str:
    """Bytes as people read them (decimal units, as the Hub shows file sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
