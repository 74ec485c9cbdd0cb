"""`mergewise calibrate BASE_DIR STATS.safetensors`: the base model's activation statistics for AIM."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="compute a base model's activation statistics (for AIM)",
        description="Hook every non-embedding module of the base model and save, per module, the "
        "per-input-channel mean |x| over tokens summed over calibration blocks.",
    )
    parser.add_argument("base_dir", help="base model folder")
    parser.add_argument("stats_path", help="output statistics file (.safetensors)")
    parser.add_argument(
        "--data",
        default="self",
        help="calibration text: a .txt/.jsonl file or folder, 'self' (the model samples its "
        "own text, offline) or hf:NAME (online)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=256,
        help="documents: the first N of 1 to --seq-len tokens (the tokenizer's special tokens "
        "counted), in their given order; or self-generated sequences",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="tokens per calibration block; the documents' tokens are concatenated and cut "
        "into whole blocks (a trailing partial block is dropped)",
    )
    parser.add_argument(
        "--statistic",
        default="mean_abs",
        help="per-channel reduction over tokens: mean_abs (the reference), rms or max",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --data self sampling")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--stream-layers", action="store_true", help="load one decoder layer at a time: memory independent of depth"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace STATS_PATH if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model folder run its own Python code (auto_map); only for code you trust",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from mergewise.aim.statistics import CalibrationSettings, calibrate
    from mergewise.config import validate_block

    settings = validate_block(
        CalibrationSettings,
        {
            "data": args.data,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "statistic": args.statistic,
            "seed": args.seed,
        },
        "mergewise calibrate",
    )
    path = calibrate(
        args.base_dir,
        args.stats_path,
        settings,
        device=args.device,
        stream_layers=args.stream_layers,
        quiet=args.quiet,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
    )
    if not args.quiet:
        print(f"statistics written to {path}")
