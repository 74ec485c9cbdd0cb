"""`mergewise zoo build ZOO_DIR --size micro|small`: build the zoo of fine-tuned models (docs/zoo.md)."""

from __future__ import annotations

import argparse

from mergewise.commands import torch_threads

TRAINING_THREADS = 2  # the budget in zoo.md is measured on 2 CPU cores


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("zoo", help="build the zoo of fine-tuned models to merge and measure")
    actions = parser.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="build (or finish building) a zoo folder")
    build.add_argument("zoo_dir", metavar="ZOO_DIR", help="folder to build into; an unfinished build there is resumed")
    build.add_argument(
        "--size", default="micro", help="micro: CPU minutes; small: SmolLM2-135M fine-tunes (tiny: for tests)"
    )
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--data-dir", help="small zoo: GSM8K-style JSONL file, or a folder holding train.jsonl")
    build.add_argument("--threads", type=int, default=None, help="torch CPU threads for training (default 2)")
    build.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    from mergewise.zoo import build_zoo  # heavy (transformers): only when building

    with torch_threads(args.threads or TRAINING_THREADS):
        manifest = build_zoo(args.zoo_dir, args.size, seed=args.seed, data_dir=args.data_dir)
    for name, record in manifest["models"].items():
        ratio = record.get("task_vector_norm_ratio")
        norm = f"  |tau|/|theta| {ratio}" if ratio is not None else ""
        print(f"{name}: final loss {record['final_loss']}  ({record['seconds']} s){norm}")
    configs = ", ".join(manifest["configs"])
    print(f"zoo ready: {args.zoo_dir}/zoo.json ({len(manifest['tasks'])} tasks; example merge configs: {configs})")
    return 0
