"""Runs `mergewise` commands in processes killed with SIGKILL just before their Nth call that changes
a file (create, truncate, write, rename, remove), for the kill sweeps of tests/test_faults.py.

It is a small server: torch and mergewise are imported once, then each request (one JSON line on
stdin: argv, cwd, kill_at, timeout) runs `mergewise.cli.main(argv)` in a fork of this process, so
that a sweep of a hundred kill points costs a fork each instead of a Python start-up. Each answer is
one JSON line: the exit status (negative: the signal that ended it), its stderr and stdout, and the
calls it made that change files, in order, each as "function name(s)" (only for a run that was not
killed).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import signal
import sys
import tempfile
import threading
import traceback

_write = os.write  # the trace is written with the function as it was


def _name(target) -> str:
    """A path's last component, or the file an open descriptor refers to."""
    if isinstance(target, int):
        target = os.readlink(f"/proc/self/fd/{target}")
    return os.path.basename(os.fsdecode(target))


def _changes_files(function: str, args: tuple, kwargs: dict) -> bool:
    """Opening a file changes it only where it creates or truncates it (a kill before opening an
    existing file for writing leaves the state a kill before its first write leaves)."""
    if function == "open":  # builtins.open
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        return isinstance(args[0], (str, bytes, os.PathLike)) and any(letter in mode for letter in "wax")
    if function == "os.open":
        return bool((args[1] if len(args) > 1 else kwargs["flags"]) & (os.O_CREAT | os.O_TRUNC))
    return True


def _install(kill_at: int | None, trace_descriptor: int) -> None:
    """Wrap the functions through which mergewise changes files: each call is counted (and traced);
    the `kill_at`th is never made, the process is killed instead."""
    lock = threading.Lock()
    count = [0]

    def wrapped(module, attribute: str, label: str):
        function = getattr(module, attribute)

        def hook(*args, **kwargs):
            if _changes_files(label, args, kwargs):
                with lock:
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    targets = (
                        [args[0]]
                        if label in ("os.pwrite", "os.sendfile", "os.ftruncate")
                        else [argument for argument in args[:2] if isinstance(argument, (str, bytes, os.PathLike))]
                    )
                    _write(trace_descriptor, f"{label} {' '.join(map(_name, targets))}\n".encode())
            return function(*args, **kwargs)

        setattr(module, attribute, hook)

    for attribute in (
        "open",
        "pwrite",
        "sendfile",
        "rename",
        "replace",
        "unlink",
        "remove",
        "rmdir",
        "mkdir",
        "truncate",
        "ftruncate",
    ):
        wrapped(os, attribute, f"os.{attribute}")
    wrapped(builtins, "open", "open")
    io.open = builtins.open


def _run(request: dict) -> dict:
    trace_descriptor, trace_path = tempfile.mkstemp(prefix="kill-harness-trace-")
    error_descriptor, error_path = tempfile.mkstemp(prefix="kill-harness-stderr-")
    child = os.fork()
    if child == 0:
        status = 70
        try:
            os.chdir(request["cwd"])
            os.dup2(error_descriptor, 2)
            os.dup2(error_descriptor, 1)
            from mergewise.cli import main

            signal.alarm(request.get("timeout", 0))  # a run that hangs ends with SIGALRM
            _install(request.get("kill_at"), trace_descriptor)
            status = main(request["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, wait_status = os.waitpid(child, 0)
    with open(trace_path) as trace, open(error_path) as errors:
        calls, stderr = trace.read().splitlines(), errors.read()
    for descriptor, path in ((trace_descriptor, trace_path), (error_descriptor, error_path)):
        os.close(descriptor)
        os.unlink(path)
    status = os.waitstatus_to_exitcode(wait_status)
    return {"status": status, "stderr": stderr, "calls": calls if status >= 0 else []}


def serve() -> None:
    import torch  # noqa: F401  (imported once here, not in each fork)

    import mergewise.cli
    import mergewise.engine

    mergewise.cli.build_parser()  # imports every command module
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_run(json.loads(line))), flush=True)


if __name__ == "__main__":
    serve()
