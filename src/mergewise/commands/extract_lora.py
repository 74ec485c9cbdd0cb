"""`mergewise extract-lora FINETUNED BASE OUT --rank R`: a PEFT LoRA adapter from a fine-tune."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract-lora",
        help="a LoRA adapter approximating a fine-tune (truncated SVD per weight)",
        description="Factorise each weight matrix's difference between FINETUNED and BASE into a rank-R "
        "LoRA (a PEFT adapter folder); embeddings and the output head are left out.",
    )
    parser.add_argument("finetuned", help="fine-tuned model folder")
    parser.add_argument("base", help="its base model folder")
    parser.add_argument("out_dir", help="output adapter folder")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from mergewise.checkpoint.extract_lora import extract_lora

    errors = extract_lora(
        args.finetuned, args.base, args.out_dir, args.rank, overwrite=args.overwrite, quiet=args.quiet
    )
    worst = max(errors, key=errors.__getitem__)
    print(
        f"{len(errors)} modules at rank {args.rank}; relative reconstruction error: mean "
        f"{sum(errors.values()) / len(errors):.4f}, worst {errors[worst]:.4f} ({worst}); adapter written to "
        f"{args.out_dir}"
    )
