"""`mergewise demo`: build the micro zoo offline (cached), merge its experts with linear and ties, build
a Mediator model of them, and score everything."""

from __future__ import annotations

import argparse
from pathlib import Path

from mergewise.commands import torch_threads
from mergewise.commands.zoo import TRAINING_THREADS

DEMO_METHODS = ["linear", "ties"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build the micro zoo, merge it (linear, ties, Mediator) and score the results",
        description="Build the micro zoo offline (reused when already built), merge "
        "its experts with linear and ties and as a Mediator model, and print a score "
        "table.",
    )
    parser.add_argument("--dir", default="mergewise-demo", help="where the zoo, merges and scores go")
    parser.add_argument("--limit", type=int, default=100, help="prompts scored per task (default 100)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from mergewise.evaluate.comparison import bar_chart, markdown_table, mediator_entry, score_entries, zoo_entries
    from mergewise.zoo import build_zoo
    from mergewise.zoo.manifest import load_zoo

    root = Path(args.dir).resolve()
    zoo_dir = root / "zoo-micro"
    print(f"building the micro zoo in {zoo_dir} (reused if already built)")
    with torch_threads(TRAINING_THREADS):
        build_zoo(zoo_dir, "micro")
    zoo = load_zoo(zoo_dir)
    entries = [*zoo_entries(zoo, DEMO_METHODS), mediator_entry(zoo)]
    results = score_entries(zoo_dir, root / "work", entries, device=args.device, limit=args.limit)
    chart = root / "scores.png"
    bar_chart(results, zoo, chart)
    print()
    print(markdown_table(results, zoo))
    print(f"\nmerged models: {root / 'work' / 'models'}   chart: {chart}")
