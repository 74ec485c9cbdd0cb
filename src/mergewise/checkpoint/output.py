"""The output model folder: built in a hidden sibling folder and renamed into place when complete.

Nothing is written into an input model, and a failed or interrupted merge leaves OUT_DIR as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
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


# Written into every output folder; `--overwrite` replaces only a folder that holds it (or an empty one).
RECORD_FILE = "mergewise.yml"


def check_output_location(out_dir: Path, inputs: list[Path], overwrite: bool, protected: list[Path] = ()) -> None:
    """Refuse destinations that would overwrite or sit inside an input model, and `--overwrite` of
    anything but an earlier mergewise output or an empty folder: never a folder holding the working
    directory or a `protected` path (the recipe)."""
    for model in inputs:
        if out_dir == model or model in out_dir.parents:
            raise MergewiseError(f"output folder {out_dir} is inside input model {model}; choose another")
        if out_dir in model.parents:
            raise MergewiseError(f"output folder {out_dir} contains input model {model}; choose another")
    if not out_dir.exists():
        return
    if not overwrite:
        raise MergewiseError(f"output folder {out_dir} already exists (use --overwrite to replace it)")
    if not out_dir.is_dir():
        raise MergewiseError(f"output path {out_dir} exists and is not a folder")
    for kept in (Path.cwd(), *protected):
        kept = Path(kept).resolve()
        if kept == out_dir or out_dir in kept.parents:
            raise MergewiseError(f"--overwrite would delete {kept}, which output folder {out_dir} holds; "
                                 "choose another output folder")
    if not (out_dir / RECORD_FILE).is_file() and any(out_dir.iterdir()):
        raise MergewiseError(f"output folder {out_dir} was not written by mergewise (no {RECORD_FILE}) and is not "
                             "empty; --overwrite replaces only those")


@contextmanager
def staged_folder(out_dir: Path, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` atomically.

    One build per `out_dir` at a time: a lock file beside it is held (released by the kernel if the
    process dies). Staging folders carry their process id; those of processes that are gone (killed
    with SIGKILL, say) are removed when the next build of `out_dir` starts. A folder that appeared at
    `out_dir` during the build is never replaced without `overwrite`. The new folder's permissions
    follow the umask, and its files are on disk before it is moved into place. With `resume`, the
    newest staging folder of a process that is gone is built on instead of a new one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir.parent / f".{out_dir.name}.lock", out_dir):
        orphans = _orphans(out_dir)
        staged = [folder for folder in orphans if folder.name.startswith(f".{out_dir.name}.partial-")]
        adopted = max(staged, key=lambda folder: folder.stat().st_mtime) if resume and staged else None
        for folder in orphans:
            if folder != adopted:
                shutil.rmtree(folder, ignore_errors=True)
        existed = out_dir.exists()
        staging = adopted or Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-",
                                                   dir=out_dir.parent))
        try:
            staging.chmod(0o777 & ~_umask())
            yield staging
            if out_dir.exists() and not (overwrite and existed):
                raise MergewiseError(f"output folder {out_dir} appeared while this one was being built; "
                                     "it was left as it is")
            _sync(staging)
        except BaseException:
            if adopted is None:  # an adopted folder stays for the next --resume (its journal is consistent)
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
            out_dir.rename(retired / out_dir.name)
            staging.rename(out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out_dir)


def _orphans(out_dir: Path) -> list[Path]:
    """Staging and retired folders of `out_dir` whose process is gone."""
    found = []
    for folder in out_dir.parent.glob(f".{out_dir.name}.*-*-*"):
        kind, _, rest = folder.name.removeprefix(f".{out_dir.name}.").partition("-")
        pid = rest.partition("-")[0]
        if kind in ("partial", "old") and pid.isdigit() and not _alive(int(pid)):
            found.append(folder)
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _sync(folder: Path) -> None:
    """Flush every file of `folder`, then the folder itself, to disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def _exclusive(lock_path: Path, out_dir: Path) -> Iterator[None]:
    """Hold `lock_path` exclusively; it is removed when released. A lock taken on a file that its
    previous holder removed meanwhile is taken again on the new one."""
    while True:
        lock = open(lock_path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise MergewiseError(f"another mergewise process is writing {out_dir}; wait for it to finish") from None
        if lock_path.exists() and os.fstat(lock.fileno()).st_ino == lock_path.stat().st_ino:
            break
        lock.close()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        lock.close()


def write_model_config(folder: Path, config: dict, dtype: torch.dtype,
                       source_layers: list[int] | None = None, vocab_size: int | None = None) -> None:
    """config.json of the source model with the output's dtype; for frankenmerges, the new depth
    and the per-layer settings (e.g. `layer_types`) of the layers each output layer came from; the
    rows of a new output vocabulary."""
    config = json.loads(json.dumps(config))
    target = config.get("text_config", config)
    target["torch_dtype"] = str(dtype).removeprefix("torch.")
    if vocab_size is not None:
        target["vocab_size"] = vocab_size
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
