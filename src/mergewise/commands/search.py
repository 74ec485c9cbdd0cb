"""`mergewise search SEARCH.yml OUT_DIR`: find the best recipe by searching its parameters on Ray Tune."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search a recipe's parameters (Ray Tune + Optuna) for the best-scoring merge",
        description="Each trial merges the recipe with values drawn from its search spaces and scores the "
        "result on validation prompts; OUT_DIR gets trials.csv, best.yml, best-model/, search.png "
        "and summary.json (the best and the baseline recipe on held-out test prompts).",
    )
    parser.add_argument("search_file", help="a recipe with search spaces and a search: block (YAML)")
    parser.add_argument("out_dir", help="output folder (new or empty, unless --resume)")
    parser.add_argument(
        "--trials", type=int, default=None, help="number of trials (default: search.trials; not with --resume)"
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to attach to (auto, ray://HOST:PORT); default: a local Ray on this machine",
    )
    parser.add_argument("--resume", action="store_true", help="continue the interrupted search in OUT_DIR")
    parser.add_argument(
        "--device",
        default=None,
        help="where trials merge and score (default: cuda when search.resources.gpus > 0, else cpu)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from mergewise.errors import MergewiseError

    if args.trials is not None and args.trials < 1:
        raise MergewiseError(f"--trials: must be at least 1, got {args.trials}")
    from mergewise.search import run_search, summary_table

    result = run_search(
        args.search_file,
        args.out_dir,
        trials=args.trials,
        address=args.address,
        resume=args.resume,
        device=args.device,
        quiet=args.quiet,
    )
    print(summary_table(result))
