"""The `mergewise` command: one sub-command per module in `mergewise.commands`."""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from mergewise.errors import MergewiseError

# Each name is a module in mergewise.commands exposing `register(subparsers)`, which adds its
# parser and sets `handler=function(args) -> int | None` as a default.
COMMAND_MODULES = ["merge", "demo", "zoo", "eval", "calibrate", "aim", "mediator", "generate"]


def build_parser() -> argparse.ArgumentParser:
    from mergewise import __version__

    parser = argparse.ArgumentParser(prog="mergewise", description="Merge fine-tuned language models.")
    parser.add_argument("--version", action="version", version=f"mergewise {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"mergewise.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
    except MergewiseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    # The interpreter's last garbage collection would walk every object torch and numba created,
    # ~0.3 s spent after the work is done; frozen objects are skipped (they are still freed).
    gc.freeze()
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
