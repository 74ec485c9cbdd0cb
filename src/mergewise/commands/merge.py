"""`mergewise merge CONFIG.yml OUT_DIR`: run a merge recipe."""

from __future__ import annotations

import argparse
import math
import os
from collections import Counter

from mergewise.errors import MergewiseError
from mergewise.options import MergeOptions


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
        help="validate and plan the recipe from the models' headers, print the plan and any "
        "warnings, and stop (no weights read, nothing written)",
    )
    add_merge_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from mergewise.engine import run_merge

    if args.check:
        check(args)
        return
    if args.out_dir is None:
        raise MergewiseError("merge: give OUT_DIR, the folder to write the merged model to (or --check)")
    result = run_merge(args.config, args.out_dir, **merge_options(args))
    if not args.quiet:
        print(f"merged model written to {result.out_dir}")


def check(args: argparse.Namespace) -> None:
    """Load and plan the recipe as a merge would, and say what the merge would write."""
    from mergewise.config import load_recipe
    from mergewise.engine import plan_recipe
    from mergewise.locator import is_remote

    recipe = load_recipe(args.config, strict=args.strict)
    remote = [path for path in recipe.config.model_paths() if is_remote(path, recipe.config_dir)]
    if remote:
        print(
            f"{args.config}: the recipe is valid; not planned, since it names Hub models that would be downloaded "
            f"first: {', '.join(remote)}"
        )
        return
    _, plan = plan_recipe(recipe, strict=args.strict, allow_pickle=args.allow_pickle)
    try:
        parameters = sum(math.prod(job.shape) for job in plan.jobs)
        dtypes = Counter(str(job.out_dtype).removeprefix("torch.") for job in plan.jobs)
        inputs = len({source.model.path for job in plan.jobs for source in job.inputs})
        base = f" onto base {plan.base_model.path}" if plan.base_model is not None else ""
        layers = len(plan.source_layers) if plan.source_layers is not None else plan.reference.num_layers
        print(
            f"{args.config}: {plan.method.name} of {inputs} model(s){base}: {len(plan.jobs)} tensors, "
            f"{parameters:,} parameters ({', '.join(f'{count} {dtype}' for dtype, count in dtypes.most_common())}), "
            f"{layers} layers"
        )
        for stage in recipe.blocks:
            print(f"  with the {stage}: block (its own work runs in the merge)")
    finally:
        for model in plan.models:
            model.close()
