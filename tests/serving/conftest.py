"""The tiny Mediator folder both serving modules serve, built once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergewise.chat_templates import NAMED, write_chat_template
from tests.support.shared import run_wide_folder
from tests.support.tiny_mediator import build_mediator_family, build_tiny_mediator


@pytest.fixture(scope="session")
def mediator_dir(tmp_path_factory) -> Path:
    """The tiny Mediator folder, with a chat template so that chat completions are served (read-only)."""
    with run_wide_folder(tmp_path_factory, "served-mediator") as root:
        folder = root / "tiny-mediator"
        if not (root / "built").exists():
            family = build_mediator_family(root / "family")
            build_tiny_mediator(family, folder)
            write_chat_template(folder, NAMED["chatml"])
            (root / "built").touch()
    return folder
