"""Peak memory of `mergewise calibrate`: layer-streamed vs in-memory, at two depths of the same width.

Each run is a measured child process (`common.run_measured`: peak resident set from `os.wait4`'s
ru_maxrss). The Llamas are random bf16 models written tensor by tensor as sharded safetensors with an
index (`workloads.random_tiny_llama`); `--arch mixtral` (a mixture of experts) and `--arch llava` (a
vision-language model) are random models saved by transformers (`workloads.random_model`). Writes
benchmarks/results/calibrate_memory.md (calibrate_memory-ARCH.md for the others).

    python benchmarks/calibrate_memory.py [--arch llama|mixtral|llava] [--depths 8 32] [--hidden 768] [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import RESULTS, mergewise_command, run_measured, write_result
from workloads import intermediate_size, random_model, random_tiny_llama

DESCRIPTIONS = {
    "llama": "Llama",
    "mixtral": "Mixtral (4 experts, 2 per token; one matrix per expert in the checkpoint)",
    "llava": "LLaVA (a one-layer CLIP vision tower, a Llama language model)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["llama", "mixtral", "llava"], default="llama")
    parser.add_argument("--depths", type=int, nargs=2, default=[8, 32])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="calibrate-memory-"))
    text = work / "calibration.txt"
    work.mkdir(parents=True, exist_ok=True)
    text.write_text(
        "\n\n".join(
            f"model merging adds the task vectors of fine tunes number {i} to the base "
            "while attention heads share keys and values"
            for i in range(400)
        )
    )
    rows = []
    for depth in args.depths:
        model = work / f"{args.arch}-{depth}"
        if args.arch == "llama":
            size = random_tiny_llama(model, depth, args.hidden)
        else:
            size = random_model(model, args.arch, depth, args.hidden)
        for label, extra in (("--stream-layers", ["--stream-layers"]), ("in-memory", [])):
            run = run_measured(
                mergewise_command(
                    "calibrate",
                    str(model),
                    str(work / "stats.safetensors"),
                    "--data",
                    str(text),
                    "--samples",
                    str(args.samples),
                    "--seq-len",
                    str(args.seq_len),
                    "--overwrite",
                    "--quiet",
                    *extra,
                )
            )
            rss, seconds = run.peak_rss_mib, run.wall_s
            rows.append((depth, label, size / 2**20, rss, seconds))
            print(
                f"depth {depth:3d} {label:16s} checkpoint {size / 2**20:7.0f} MiB  "
                f"peak RSS {rss:7.0f} MiB  {seconds:5.1f} s"
            )
    streamed = [rss for _, label, _, rss, _ in rows if label == "--stream-layers"]
    ratio = max(streamed) / min(streamed)
    lines = [
        "# Peak memory of `mergewise calibrate`",
        "",
        f"Random bf16 {DESCRIPTIONS[args.arch]}, hidden {args.hidden}, intermediate "
        f"{args.hidden * 8 // 3 if args.arch == 'llama' else intermediate_size(args.hidden)}, vocab 256; "
        f"{args.samples} blocks × {args.seq_len} tokens from a text file; CPU; peak RSS of the child process "
        "(`os.wait4` ru_maxrss), including Python, torch and transformers themselves.",
        "",
        "| layers | pass | checkpoint (MiB) | peak RSS (MiB) | wall (s) |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {depth} | {label} | {size:.0f} | {rss:.0f} | {seconds:.1f} |"
            for depth, label, size, rss, seconds in rows
        ),
        "",
        f"`--stream-layers` peak RSS, deepest / shallowest: **{ratio:.2f}×** (flat means within 1.20×).",
    ]
    report = RESULTS / ("calibrate_memory.md" if args.arch == "llama" else f"calibrate_memory-{args.arch}.md")
    write_result(report, "\n".join(lines) + "\n")
    print(f"ratio {ratio:.2f}; written to {report}")


if __name__ == "__main__":
    main()
