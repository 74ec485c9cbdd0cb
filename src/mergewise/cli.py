"""The `mergewise` command: one sub-command per module in `mergewise.commands`."""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import importlib
import os
import signal
import sys
import threading
import warnings

from mergewise._version import __version__
from mergewise.errors import MergewiseError

# Each name is a module in mergewise.commands exposing `register(subparsers)`, which adds its
# parser and sets `handler=function(args) -> int | None` as a default.
COMMAND_MODULES = [
    "merge",
    "demo",
    "zoo",
    "eval",
    "calibrate",
    "aim",
    "mediator",
    "moe",
    "generate",
    "serve",
    "extract_lora",
    "search",
    "warm_up",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergewise", description="Merge fine-tuned language models.")
    parser.set_defaults(keep_freed_buffers=True)  # a command that holds its weights whole sets False
    parser.add_argument("--version", action="version", version=f"mergewise {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"mergewise.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _tune_process(keep_freed_buffers=args.keep_freed_buffers)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    formatting, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        status = args.handler(args)
    except MergewiseError as error:
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder, too many open files…
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {_one_line(f'{where}{error.strerror or error}')}", file=sys.stderr)
        return 2
    except _Terminated:
        print("error: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatting
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return int(status or 0)


_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """mergewise's own warnings as one `warning: …` line each, like its errors; others as Python shows them."""
    if category.__module__.split(".")[0] == "mergewise":
        return f"warning: {_one_line(str(message))}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def _one_line(text: str) -> str:
    """`text` as one line of plain characters: a message quotes names and keys from downloaded files,
    which may hold line breaks or terminal escapes; those are shown as Python writes them (`\\n`)."""
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a merge in progress cleans up its staging folder."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def _tune_process(keep_freed_buffers: bool = True) -> None:
    """Settings for streaming work on few cores, made before torch loads (a user's own win). On a
    0.2 B-parameter merge on 2 cores the spin and heap settings cut CPU time by about a fifth."""
    # OpenMP workers spin ~300k rounds after each parallel region by default, taking a core from the
    # reader and writer threads; a short spin still bridges the gap between two operations.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    # numpy's OpenBLAS starts a thread per core that spins while idle; mergewise's numpy work is
    # element-wise, so those threads only took ~0.2 s of CPU from a 2-core TIES merge.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if keep_freed_buffers:
        _keep_freed_buffers()
    _import_torch()


# glibc's mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_freed_buffers() -> None:
    """glibc hands row-chunk sized blocks back to the kernel when they are freed, and the next chunk
    faults them in again page by page, zeroed: ~1 s of CPU per 0.2 B merged parameters. Keep them in
    the heap instead (up to 256 MB of free space at its top)."""
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def _import_torch() -> None:
    """Every command needs torch. Its import creates millions of long-lived objects, and the garbage
    collector would walk them all again and again as they pile up (~0.3 s per process): import it
    with collection paused, then freeze what it created so later collections skip it."""
    if "torch" in sys.modules:  # already loaded by whoever called `main`
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def run() -> None:
    """The console command. Once a command is done, the process ends without the interpreter's
    teardown, which frees torch's millions of objects one by one (~0.15 s); everything a normal exit
    does first still happens: other threads are joined, exit handlers run, output is flushed."""
    status = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
