"""The output model folder: built in a hidden sibling folder and renamed into place when complete.

Nothing is written into an input model, and a failed or interrupted merge leaves OUT_DIR as it was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from mergewise.checkpoint.reader import DEPTH_KEYS, inside_folder
from mergewise.errors import MergewiseError

# Files that describe how to tokenize and generate; copied verbatim from the tokenizer source.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "generation_config.json",
)


def check_output_location(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse destinations that would overwrite or sit inside an input model."""
    for model in inputs:
        if out_dir == model or model in out_dir.parents:
            raise MergewiseError(f"output folder {out_dir} is inside input model {model}; choose another")
        if out_dir in model.parents:
            raise MergewiseError(f"output folder {out_dir} contains input model {model}; choose another")
    if out_dir.exists() and not overwrite:
        raise MergewiseError(f"output folder {out_dir} already exists (use --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergewiseError(f"output path {out_dir} exists and is not a folder")


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` atomically."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(retired / out_dir.name)
        staging.rename(out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out_dir)


def write_model_config(folder: Path, config: dict, dtype: torch.dtype,
                       source_layers: list[int] | None = None) -> None:
    """config.json of the source model with the output's dtype; for frankenmerges, the new depth
    and the per-layer settings (e.g. `layer_types`) of the layers each output layer came from."""
    config = json.loads(json.dumps(config))
    target = config.get("text_config", config)
    target["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in target:
        target["dtype"] = target["torch_dtype"]
    if source_layers is not None:
        for key in DEPTH_KEYS:
            if key in target:
                target[key] = len(source_layers)
        if isinstance(target.get("layer_types"), list):
            target["layer_types"] = [target["layer_types"][index] for index in source_layers]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(source: Path, folder: Path) -> None:
    """Copy the tokenizer files of `source`; each must be a regular file inside it (a symlink to
    elsewhere would copy that file's content into the output)."""
    for name in TOKENIZER_FILES:
        file = source / name
        if file.exists() or file.is_symlink():
            shutil.copyfile(inside_folder(file, source, "tokenizer file"), folder / name)
