"""`mergewise mediator analyze|build|export`: conflict analysis and routed-expert models."""

from __future__ import annotations

import argparse

from mergewise.commands.merge import add_merge_options, merge_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mediator",
        help="conflict analysis and routed dense + coded experts",
        description="Mediator: measure where fine-tunes conflict, average the calm "
        "layers and route the conflicting ones per prompt.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    analyze = actions.add_parser("analyze", help="per-layer sign conflict, cancellation and cosines (CSV, JSON, PNG)")
    analyze.add_argument("config", help="Mediator recipe (YAML with a mediator: block)")
    analyze.add_argument("report_dir", help="folder for conflict.csv, conflict.json and conflict.png")
    analyze.add_argument("--overwrite", action="store_true", help="replace REPORT_DIR if it exists")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    analyze.set_defaults(handler=run_analyze)

    build = actions.add_parser("build", help="write a Mediator model folder")
    build.add_argument("config", help="Mediator recipe (YAML with a mediator: block)")
    build.add_argument("out_dir", help="output model folder")
    add_merge_options(build)
    build.set_defaults(handler=run_build)

    export = actions.add_parser("export", help="write the plain model D + S_task of one expert")
    export.add_argument("mediator_dir", help="Mediator model folder")
    export.add_argument("out_dir", help="output model folder")
    export.add_argument("--task", required=True, help="the expert to bake in")
    export.add_argument("--shard-size", default="5GB", help="largest output shard")
    export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(handler=run_export)


def run_analyze(args: argparse.Namespace) -> None:
    from mergewise.mediator.analysis import analyze_to_folder
    from mergewise.mediator.settings import load_recipe

    report = analyze_to_folder(load_recipe(args.config), args.report_dir, overwrite=args.overwrite, quiet=args.quiet)
    if not args.quiet:
        worst = max(report.units, key=lambda unit: unit.sign_conflict)
        print(
            f"{len(report.units)} units analysed; highest sign conflict {worst.sign_conflict:.4f} in "
            f"{worst.unit}; report written to {args.report_dir}"
        )


def run_build(args: argparse.Namespace) -> None:
    from mergewise.mediator.build import build

    summary = build(args.config, args.out_dir, **merge_options(args))
    print(summary.describe())
    if not args.quiet:
        print(f"Mediator model written to {summary.out_dir}")


def run_export(args: argparse.Namespace) -> None:
    from mergewise.mediator.export import export_task

    out_dir = export_task(
        args.mediator_dir,
        args.task,
        args.out_dir,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    if not args.quiet:
        print(f"expert {args.task} written to {out_dir}")
