"""Merge quality on a zoo: the base, every expert and each core method, per task.

    python benchmarks/quality.py --zoo /path/to/zoo            # builds nothing; scores what the zoo holds
    python benchmarks/quality.py --zoo Z --methods ties linear

Writes benchmarks/results/quality-<size>.md (a markdown table) and quality-<size>.png (bar chart).
Merges and scores are cached under --work, so reruns only compute what is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mergewise.evaluate.comparison import CORE_METHOD_SETTINGS, bar_chart, compare_on_zoo, markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, help="zoo folder (mergewise zoo build)")
    parser.add_argument("--work", default=None, help="cache of merges and scores (default: ZOO/quality)")
    parser.add_argument("--methods", nargs="+", default=list(CORE_METHOD_SETTINGS), choices=list(CORE_METHOD_SETTINGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N prompts per task")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = Path(args.work or Path(args.zoo) / "quality")
    results, zoo = compare_on_zoo(args.zoo, work, args.methods, device=args.device, limit=args.limit)
    size = zoo.raw.get("size", "zoo")
    args.results.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, zoo)
    settings = "\n".join(f"- `{method}`: {CORE_METHOD_SETTINGS[method]['per_model']}" for method in args.methods)
    (args.results / f"quality-{size}.md").write_text(
        f"# Merge quality on the {size} zoo\n\nExact match per task (greedy), general NLL per token on "
        f"held-out text.\n\n{table}\n\nSettings (every expert, float32):\n{settings}\n")
    bar_chart(results, zoo, args.results / f"quality-{size}.png")
    print(table)


if __name__ == "__main__":
    main()
