"""`mergewise aim --base B --merged M --stats S --omega 0.4 OUT_DIR`: relax an existing merge."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aim",
        help="apply activation-informed relaxation to a merged model",
        description="W = W_b + (W_m - W_b) * (1 - (1 - omega) * I), I = base activations / their maximum, "
        "per input channel of every calibrated module; embeddings are copied unchanged.",
    )
    parser.add_argument("out_dir", help="output model folder")
    parser.add_argument("--base", required=True, help="base model folder the statistics were computed on")
    parser.add_argument("--merged", required=True, help="merged model folder to relax")
    parser.add_argument("--stats", required=True, help="statistics from `mergewise calibrate`")
    parser.add_argument(
        "--omega",
        type=float,
        default=0.4,
        help="1 keeps the merge; 0 fully restores the most-activated channels (default 0.4)",
    )
    parser.add_argument("--exponent", type=float, default=1.0, help="importance exponent (1: the reference)")
    parser.add_argument("--modules", default=None, help="regular expression: relax only matching weight names")
    parser.add_argument(
        "--allow-fingerprint-mismatch",
        action="store_true",
        help="warn instead of failing when the stats were computed on another base",
    )
    parser.add_argument("--shard-size", default="5GB", help="largest output shard")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from mergewise.aim.relax import AimSettings, relax_folder
    from mergewise.config import validate_block

    settings = validate_block(
        AimSettings,
        {
            "omega": args.omega,
            "exponent": args.exponent,
            "modules": args.modules,
            "allow_fingerprint_mismatch": args.allow_fingerprint_mismatch,
        },
        "mergewise aim",
    )
    out_dir = relax_folder(
        args.base,
        args.merged,
        args.stats,
        args.out_dir,
        settings,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    if not args.quiet:
        print(f"relaxed model written to {out_dir}")
