"""Loads the bf16 kernels on a background thread, so a merge never waits for them.

Importing numba and loading the compiled kernels takes ~0.7 s per process (compiling them the first
time, several seconds). Meanwhile the merge runs on the eager torch path, whose output is
bit-identical, and switches to the kernels once they are ready. Should they fail to load (numba
missing or unsupported here), the merge simply stays eager.

The loading thread is a daemon, so that it never holds a caller's process open nor shows among its
threads; a process whose merge ends first still waits for it at exit (an exit handler), because
interpreter shutdown in the middle of an LLVM compilation aborts the process (and the finished
compilation is cached for the next run).
"""

from __future__ import annotations

import atexit
import importlib
import threading
import warnings
from concurrent.futures import Future
from types import ModuleType

_lock = threading.Lock()
_loads: dict[int, Future] = {}


def bf16_kernels(input_count: int = 1, *, wait: bool = False) -> ModuleType | None:
    """The kernel module once it is loaded and warm for `input_count` inputs; None until then, or
    for good if it cannot load. The first call starts the loading; `wait` blocks until it ends."""
    with _lock:
        if input_count not in _loads:
            if not _loads:
                atexit.register(_finish_loading)
            _loads[input_count] = Future()
            threading.Thread(
                target=_load, args=(input_count, _loads[input_count]), daemon=True, name="mergewise-kernels"
            ).start()
        loading = _loads[input_count]
    return loading.result() if wait or loading.done() else None


def _finish_loading() -> None:
    """At exit: let a compilation in progress end (see above)."""
    for loading in list(_loads.values()):
        loading.result()


def _load(input_count: int, loading: Future) -> None:
    try:
        module = importlib.import_module("mergewise.methods.bf16_kernels")
        module.warm_up(input_count)
    except Exception as error:  # numba missing, or no build for this platform: stay eager
        warnings.warn(
            f"fused bf16 kernels unavailable ({type(error).__name__}: {error}); merging with torch's eager operations",
            RuntimeWarning,
            stacklevel=1,
        )
        module = None
    loading.set_result(module)
