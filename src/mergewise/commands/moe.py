"""`mergewise moe CONFIG OUT_DIR`: a mixture-of-experts model from a mergekit-moe recipe."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "moe",
        help="build a mixture-of-experts model from fine-tunes (mergekit-moe recipes)",
        description="Turn each fine-tune's MLPs into one expert of every layer of a Mixtral, DeepSeek, "
        "Qwen2-MoE or Qwen3-MoE model, with gates from the experts' prompts (mergekit-moe's YAML, unchanged; "
        "gate_mode: mediator fits the gates like Mediator's router). Reports the share of each expert's "
        "held-out prompts its gates route to it, per layer.",
    )
    parser.add_argument("config", help="mergekit-moe recipe (YAML)")
    parser.add_argument("out_dir", help="output model folder")
    parser.add_argument("--dry-run", action="store_true", help="list the output's tensors and sources; read no weights")
    parser.add_argument("--device", default="cpu", help="where the gates' forward pass runs (cpu, cuda, ...)")
    parser.add_argument("--random-seed", type=int, default=0, help="seed of random gates and noise_scale noise")
    parser.add_argument("--shard-size", default="5GB", help="largest output shard")
    parser.add_argument(
        "--i-understand-this-is-not-useful-without-training",
        dest="allow_all_same",
        action="store_true",
        help="allow every expert to be the same model",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="accept pytorch_model*.bin inputs (loaded with weights_only=True)"
    )
    parser.add_argument("--strict", action="store_true", help="refuse keys mergekit-moe would ignore")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from mergewise.moe.build import build_moe, dry_run_lines, plan_moe

    plan = plan_moe(args.config, strict=args.strict, allow_pickle=args.allow_pickle, allow_all_same=args.allow_all_same)
    if args.dry_run:
        print("\n".join(dry_run_lines(plan)))
        return
    result = build_moe(
        plan,
        args.out_dir,
        overwrite=args.overwrite,
        device=args.device,
        seed=args.random_seed,
        shard_size=args.shard_size,
        quiet=args.quiet,
    )
    shares = result.heldout_shares
    routed = (
        "held-out prompts routed to their own expert, per layer: "
        + " ".join(f"{share:.0%}" for share in shares)
        + f" (mean {sum(shares) / len(shares):.0%})"
        if shares is not None
        else "routing not scored (it needs 2 positive prompts per expert)"
    )
    print(f"{plan.output.name} with {len(plan.experts)} experts written to {args.out_dir}; {routed}")
