"""`mergewise eval MODEL_DIR --zoo ZOO_DIR`: score a model on a zoo's tasks and held-out text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="score a model on a zoo's tasks (exact match, NLL)")
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    parser.add_argument("--zoo", required=True, metavar="ZOO_DIR")
    parser.add_argument("--out", metavar="RESULTS_JSON", help="also write the results as JSON here")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="score only these tasks (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="score at most N prompts per task (and N general windows)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model folder run its own Python code (auto_map); only for code you trust",
    )
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from mergewise.evaluate import evaluate_model, format_table  # heavy (transformers): only when scoring

    results = evaluate_model(
        args.model_dir,
        args.zoo,
        tasks=args.tasks,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.limit,
        trust_remote_code=args.trust_remote_code,
    )
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0
