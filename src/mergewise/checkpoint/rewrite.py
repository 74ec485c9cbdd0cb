"""A model folder copied tensor by tensor through a per-row-chunk transform (AIM's relaxation of a
merged folder, Mediator's export of one expert)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from mergewise.checkpoint.files import inside_folder
from mergewise.checkpoint.output import RECORD_FILE, check_output_location, copy_tokenizer, staged_folder
from mergewise.checkpoint.reader import ModelFolder
from mergewise.checkpoint.record import extended_record
from mergewise.checkpoint.writer import PlannedTensor, StreamingShardWriter, parse_size, write_text
from mergewise.chunking import row_ranges

# A per-row-chunk rewrite of one stored tensor: (tensor name, rows, stored rows) → new rows.
ChunkTransform = Callable[[str, slice, torch.Tensor], torch.Tensor]


def rewrite_folder(
    source: ModelFolder,
    out_dir: Path,
    transform: ChunkTransform,
    *,
    record_key: str,
    record: dict,
    inputs: list[Path],
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Copy a model folder tensor by tensor in row chunks through `transform`, into a staged `out_dir`;
    config and tokenizer are copied and mergewise.yml gains `record` under `record_key`."""
    out_dir = Path(out_dir).expanduser().resolve()
    check_output_location(out_dir, inputs, overwrite)
    history = extended_record(source.path, record_key, record)
    tensors = list(source.tensors.values())
    with staged_folder(out_dir, overwrite) as staging:
        writer = StreamingShardWriter(
            staging,
            [PlannedTensor(t.name, t.shape, t.dtype) for t in tensors],
            parse_size(shard_size),
            metadata={"merged_by": f"mergewise {record_key}"},
        )
        for info in tqdm(tensors, desc=record_key, disable=quiet):
            for rows in row_ranges(info.shape):
                chunk = transform(info.name, rows, source.read(info.name, rows))
                writer.write(info.name, chunk.to(info.dtype), rows.start or 0)
        writer.close()
        shutil.copyfile(inside_folder(source.path / "config.json", source.path, "config.json"), staging / "config.json")
        copy_tokenizer(source.path, staging)
        write_text(staging / RECORD_FILE, yaml.safe_dump(history, sort_keys=False))
    return out_dir
