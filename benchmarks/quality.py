"""Merge quality on a zoo: the base, every expert and each core method, per task, with and without AIM.

    python benchmarks/quality.py --zoo /path/to/zoo                      # core methods
    python benchmarks/quality.py --zoo Z --aim 0.2 0.4 0.6 --limit 40     # plus AIM at each ω

Writes benchmarks/results/quality-<size>.md (a markdown table) and quality-<size>.png (bar chart).
Merges, statistics and scores are cached under --work, so reruns only compute what is missing. AIM
statistics come from `calibrate --data self` on the zoo's base (the offline default).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS, write_result

from mergewise.evaluate.comparison import (
    CORE_METHOD_SETTINGS,
    Entry,
    bar_chart,
    markdown_table,
    score_entries,
    zoo_entries,
)
from mergewise.zoo.manifest import Zoo, load_zoo


def aim_entries(
    zoo: Zoo, work: Path, methods: list[str], omegas: list[float], samples: int, seq_len: int
) -> list[Entry]:
    """Each method's plain merge relaxed at each ω (`mergewise aim` on the cached plain merge)."""
    from mergewise.aim import AimSettings, CalibrationSettings, calibrate, relax_folder

    stats = work / "aim-stats.safetensors"
    if not stats.is_file():
        calibrate(zoo.base, stats, CalibrationSettings(data="self", samples=samples, seq_len=seq_len), quiet=True)
    plain = {entry.label: entry for entry in zoo_entries(zoo, methods)}
    entries = []
    for method in methods:
        for omega in omegas:

            def produce(work: Path, method=method, omega=omega) -> Path:
                out = work / "models" / f"{method}+aim{omega}"
                if not (out / "config.json").is_file():
                    relax_folder(
                        zoo.base,
                        plain[method].produce(work),
                        stats,
                        out,
                        AimSettings(omega=omega),
                        overwrite=True,
                        quiet=True,
                    )
                return out

            entries.append(Entry(f"{method} + AIM ω={omega}", produce))
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, help="zoo folder (mergewise zoo build)")
    parser.add_argument("--work", default=None, help="cache of merges and scores (default: ZOO/quality)")
    parser.add_argument("--methods", nargs="+", default=list(CORE_METHOD_SETTINGS), choices=list(CORE_METHOD_SETTINGS))
    parser.add_argument(
        "--aim",
        nargs="*",
        type=float,
        default=[],
        metavar="OMEGA",
        help="also score every method relaxed by AIM at these ω",
    )
    parser.add_argument("--aim-samples", type=int, default=64)
    parser.add_argument("--aim-seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N prompts per task")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    zoo = load_zoo(args.zoo)
    work = Path(args.work or Path(args.zoo) / "quality")
    entries = zoo_entries(zoo, args.methods)
    if args.aim:
        entries += aim_entries(zoo, work, args.methods, args.aim, args.aim_samples, args.aim_seq_len)
    results = score_entries(args.zoo, work, entries, device=args.device, limit=args.limit)
    size = zoo.raw.get("size", "zoo")
    table = markdown_table(results, zoo)
    settings = "\n".join(
        f"- `{method}`: {CORE_METHOD_SETTINGS[method]['per_model']} per expert" for method in args.methods
    )
    scored = f"first {args.limit} prompts per task" if args.limit else "every held-out prompt"
    write_result(
        args.results / f"quality-{size}.md",
        f"# Merge quality on the {size} zoo\n\nPer task: exact match (greedy) or answer NLL per token ({scored}); "
        "general NLL per token on "
        f"held-out text. Experts merged in float32 with:\n{settings}\n"
        + (
            f"\nAIM: statistics from `calibrate --data self` ({args.aim_samples} × {args.aim_seq_len} tokens) "
            "on the base, relaxation applied to each plain merge.\n"
            if args.aim
            else ""
        )
        + f"\n{table}\n",
    )
    bar_chart(
        {label: result for label, result in results.items() if "AIM" not in label},
        zoo,
        args.results / f"quality-{size}.png",
    )
    print(table)


if __name__ == "__main__":
    main()
