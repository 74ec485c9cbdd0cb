"""`mergewise warm-up`: compile the merge kernels once, after installing, so no merge waits for them."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "warm-up",
        help="compile the merge kernels into numba's cache (once per install)",
        description="Compile mergewise's numba kernels (selections, fused bf16 arithmetic) into "
        "numba's on-disk cache, so that the first merge on this machine runs as fast as the next. "
        "Later runs only load them; a merge that finds them missing compiles them itself.",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from mergewise.methods.kernel_loading import warm_up_all

    for module, seconds in warm_up_all():
        if not args.quiet:
            print(f"{module}: ready in {seconds:.1f} s")
