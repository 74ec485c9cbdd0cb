"""Loads the bf16 kernels on a background thread, so a merge never waits for them.

Importing numba and loading the compiled kernels takes ~0.7 s per process (compiling them the first
time, ~3 s; `mergewise warm-up` does that once after installing). Meanwhile the merge runs on the
eager torch path, whose output is bit-identical, and switches to the kernels once they are ready.
Should they fail to load (numba missing or unsupported here), the merge simply stays eager.

The loading thread is a daemon, so that it never holds a caller's process open nor shows among its
threads; a process whose merge ends first still waits for it at exit (an exit handler), because
interpreter shutdown in the middle of an LLVM compilation aborts the process (and the finished
compilation is cached for the next run).
"""

from __future__ import annotations

import atexit
import importlib
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from types import ModuleType

_lock = threading.Lock()
_loading: Future | None = None


def bf16_kernels(*, wait: bool = False) -> ModuleType | None:
    """The kernel module once it is loaded and warm; None until then, or for good if it cannot load.
    The first call starts the loading; `wait` blocks until it ends."""
    global _loading
    with _lock:
        if _loading is None:
            atexit.register(_finish_loading)
            _loading = Future()
            threading.Thread(target=_load, args=(_loading,), daemon=True, name="mergewise-kernels").start()
        loading = _loading
    return loading.result() if wait or loading.done() else None


def _finish_loading() -> None:
    """At exit: let a compilation in progress end (see above)."""
    if _loading is not None:
        _loading.result()


def _load(loading: Future) -> None:
    try:
        module = importlib.import_module("mergewise.methods.bf16_kernels")
        module.warm_up()
    except Exception as error:  # numba missing, or no build for this platform: stay eager
        warnings.warn(
            f"fused bf16 kernels unavailable ({type(error).__name__}: {error}); merging with torch's eager operations",
            RuntimeWarning,
            stacklevel=1,
        )
        module = None
    loading.set_result(module)


# Every module of numba kernels a merge may use, each with a `warm_up()`.
KERNEL_MODULES = ("mergewise.methods.bf16_bits", "mergewise.methods.sort_order", "mergewise.methods.bf16_kernels")


def warm_up_all() -> Iterator[tuple[str, float]]:
    """Load every merge kernel, compiling it into numba's on-disk cache the first time, so that the
    first merge on a machine does not compile them: each module's name and seconds, as it is done."""
    for name in KERNEL_MODULES:
        started = time.perf_counter()
        importlib.import_module(name).warm_up()
        yield name, time.perf_counter() - started
