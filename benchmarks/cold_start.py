"""The first merge on a fresh machine against the second: what compiling the numba kernels costs.

    python benchmarks/cold_start.py [--methods ties sce della] [--repeats 5]

Each round gives numba an empty cache folder (`NUMBA_CACHE_DIR`), as a fresh install has, and
then, for each method on W1 (the bf16 Llama of `vs_mergekit.py`):
- *after warm-up*: `mergewise warm-up` (the install step), then the first merge and a second one;
- *no warm-up*: the first merge into yet another empty cache (the merge compiles what it needs),
  then a second one.
The table gives the medians over the rounds and the median of the first/second ratios. Writes
benchmarks/results/cold_start.md (`--report` for another name).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import yaml
from common import RESULTS, WORK, mergewise_command, run_measured, write_report
from vs_mergekit import merge_config
from workloads import LlamaShape, build_workload

TARGET_RATIO = 1.2  # the first merge after installing takes at most this many times the second


def merge_seconds(config: Path, out: Path, env: dict[str, str]) -> float:
    command = mergewise_command("merge", str(config), str(out), "--quiet", "--overwrite")
    return run_measured(command, out.with_suffix(".log"), env).wall_s


def one_round(config: Path, out: Path, warm_up: bool) -> tuple[float, float]:
    """(first, second) merge seconds with a fresh numba cache, warmed up first or not."""
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        if warm_up:
            run_measured(mergewise_command("warm-up", "--quiet"), out.with_suffix(".warm-up.log"), env)
        return merge_seconds(config, out, env), merge_seconds(config, out, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ties", "sce", "della"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=WORK)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", default="cold_start.md", help="file name of the report")
    args = parser.parse_args()
    workload = build_workload(args.workdir, LlamaShape())
    runs = args.workdir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    lines = [
        "| method | setup | first merge s (median) | second merge s (median) | first / second (median) | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for method in args.methods:
        config = runs / f"cold-start-{method}.yaml"
        config.write_text(yaml.safe_dump(merge_config(method, workload), sort_keys=False))
        out = runs / f"cold-start-{method}"
        for warm_up, setup in ((True, "after `mergewise warm-up`"), (False, "no warm-up")):
            pairs = [one_round(config, out, warm_up) for _ in range(args.repeats)]
            firsts, seconds = zip(*pairs)
            ratio = statistics.median(first / second for first, second in pairs)
            target = f"≤ {TARGET_RATIO:g}" if warm_up else ""
            row = f"| {method} | {setup} | {statistics.median(firsts):.1f} | {statistics.median(seconds):.1f} | "
            lines.append(row + f"{ratio:.2f} | {target} |")
            print(lines[-1], flush=True)
    body = f"W1, {args.repeats} rounds, a fresh numba cache each.\n\n" + "\n".join(lines)
    write_report(args.results / args.report, "First merge after installing against the second", body, None)


if __name__ == "__main__":
    main()
