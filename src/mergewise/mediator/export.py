"""`mergewise mediator export DIR --task T OUT_DIR`: the plain model D + decode(r_T), for any runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from mergewise.checkpoint import ModelFolder
from mergewise.checkpoint.rewrite import rewrite_folder
from mergewise.errors import MergewiseError
from mergewise.mediator.runtime import ExpertBank, is_mediator_folder, read_manifest


def export_task(
    mediator_dir: str | Path,
    task: str,
    out_dir: str | Path,
    *,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    folder = Path(mediator_dir).expanduser().resolve()
    if not is_mediator_folder(folder):
        raise MergewiseError(f"{folder}: not a Mediator folder (no mediator/mediator.json)")
    manifest = read_manifest(folder)
    if task not in manifest["tasks"]:
        raise MergewiseError(f"--task {task}: not an expert of {folder} (has {', '.join(manifest['tasks'])})")
    dense = ModelFolder(folder)
    experts = ExpertBank(folder, {**manifest, "tasks": [task]}, dense, None)  # each row range read as it is written

    def add_expert(name: str, rows: slice, chunk: torch.Tensor) -> torch.Tensor:
        if name not in experts.codes:
            return chunk
        matrix = chunk.reshape(chunk.shape[0], -1) if chunk.dim() >= 2 else chunk.reshape(1, -1)
        matrix_rows = rows if chunk.dim() >= 2 else slice(0, 1)
        return experts.expert_rows(name, matrix_rows, matrix, {task: 1.0}).reshape(chunk.shape)

    try:
        return rewrite_folder(
            dense,
            Path(out_dir),
            add_expert,
            record_key="mediator_export",
            record={"source": str(folder), "task": task},
            inputs=[folder],
            shard_size=shard_size,
            overwrite=overwrite,
            quiet=quiet,
        )
    finally:
        dense.close()
