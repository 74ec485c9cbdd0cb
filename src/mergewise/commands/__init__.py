"""One module per sub-command (`cli.COMMAND_MODULES`), and what they share: the process settings
that only the command line chooses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mergewise.errors import MergewiseError


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's CPU threads set to `count` while a command works, and put back after: `cli.main` may
    run inside a caller's process."""
    import torch

    if count < 1:
        raise MergewiseError(f"--threads: must be at least 1, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
