"""`mergewise mediator export DIR --task T OUT_DIR`: the plain model D + S_T, for any runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from mergewise.checkpoint import ModelFolder
from mergewise.engine import rewrite_folder
from mergewise.errors import MergewiseError
from mergewise.mediator.runtime import ExpertBank, is_mediator_folder, read_manifest
from mergewise.mediator.sparse import materialize


def export_task(mediator_dir: str | Path, task: str, out_dir: str | Path, *, shard_size: str | int = "5GB",
                overwrite: bool = False, quiet: bool = False) -> Path:
    folder = Path(mediator_dir).expanduser().resolve()
    if not is_mediator_folder(folder):
        raise MergewiseError(f"{folder}: not a Mediator folder (no mediator/mediator.json)")
    manifest = read_manifest(folder)
    if task not in manifest["tasks"]:
        raise MergewiseError(f"--task {task}: not an expert of {folder} (has {', '.join(manifest['tasks'])})")
    dense = ModelFolder(folder)
    shapes = {name: torch.Size(dense.tensors[name].shape) for name in manifest["routed_tensors"]}
    experts = ExpertBank(folder, {**manifest, "tasks": [task]}, shapes, torch.device("cpu"))

    def add_expert(name: str, rows: slice, chunk: torch.Tensor) -> torch.Tensor:
        """D + S_T on these rows: the stored flat indices are sorted, so the rows' part is one slice."""
        if name not in shapes:
            return chunk
        indices, values = experts.entries[task, name]
        first = (rows.start or 0) * (chunk[0].numel() if chunk.dim() else 1)
        low, high = torch.searchsorted(indices, torch.tensor([first, first + chunk.numel()])).tolist()
        return materialize(chunk, [(indices[low:high] - first, values[low:high], 1.0)])

    try:
        return rewrite_folder(dense, Path(out_dir), add_expert, record_key="mediator_export",
                              record={"source": str(folder), "task": task}, inputs=[folder],
                              shard_size=shard_size, overwrite=overwrite, quiet=quiet)
    finally:
        dense.close()
