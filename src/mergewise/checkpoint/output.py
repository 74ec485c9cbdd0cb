"""The output model folder: built in a hidden sibling folder and renamed into place when complete.

Nothing is written into an input model, and a failed or interrupted merge leaves OUT_DIR as it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from mergewise.checkpoint.journal import JOURNAL_FILE, recorded_fingerprint
from mergewise.checkpoint.reader import DEPTH_KEYS, inside_folder
from mergewise.errors import MergewiseError

# Files that describe how to tokenize and generate; copied verbatim from the tokenizer source.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


# Written into every output folder; `--overwrite` replaces only a folder that holds it (or an empty one).
RECORD_FILE = "mergewise.yml"


def check_output_location(out_dir: Path, inputs: list[Path], overwrite: bool, protected: Sequence[Path] = ()) -> None:
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
            raise MergewiseError(
                f"--overwrite would delete {kept}, which output folder {out_dir} holds; choose another output folder"
            )
    if not (out_dir / RECORD_FILE).is_file() and any(out_dir.iterdir()):
        raise MergewiseError(
            f"output folder {out_dir} was not written by mergewise (no {RECORD_FILE}) and is not "
            "empty; --overwrite replaces only those"
        )


class RestoredOutputWarning(RuntimeWarning):
    """An `--overwrite` was killed between its two renames; the output it was replacing is back in place."""


@contextmanager
def staged_folder(out_dir: Path, overwrite: bool = False, resume: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` atomically.

    One build per `out_dir` at a time: a lock file beside it is held (released by the kernel if the
    process dies). Staging folders carry their process id; those of processes that are gone (killed
    with SIGKILL, say) are removed when the next build of `out_dir` starts, and an output that a killed
    `--overwrite` had set aside is put back if `out_dir` is missing. A folder that appeared at `out_dir`
    during the build is never replaced without `overwrite`. The new folder's permissions follow the
    umask, and its files are on disk before its journal is removed and it is moved into place. With
    `resume` (the fingerprint of the plan, see journal.py), the newest staging folder of a process that
    is gone whose journal records that fingerprint is built on instead of a new one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir.parent / f".{out_dir.name}.lock", out_dir):
        _recover_replaced_output(out_dir)
        if out_dir.exists() and not overwrite:
            raise MergewiseError(f"output folder {out_dir} already exists (use --overwrite to replace it)")
        staged = _orphans(out_dir, "partial")
        adopted = _resumable(staged, resume) if resume is not None else None
        for folder in staged:
            if folder != adopted:
                _remove(folder)
        existed = out_dir.exists()
        staging = adopted or Path(
            tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent)
        )
        try:
            staging.chmod(0o777 & ~_umask())
            yield staging
            if out_dir.exists() and not (overwrite and existed):
                raise MergewiseError(
                    f"output folder {out_dir} appeared while this one was being built; it was left as it is"
                )
            _sync(staging)
            (staging / JOURNAL_FILE).unlink(missing_ok=True)  # last: only a folder with a journal is built on
            _sync_folder(staging)
        except BaseException:
            if adopted is None:  # an adopted folder stays for the next --resume (its journal is consistent)
                shutil.rmtree(staging, ignore_errors=True)
            raise
        _move_into_place(staging, out_dir)


# In a retired folder (`.NAME.old-PID-…`), an output set aside by `--overwrite` is kept under its own
# name while it may have to be put back, and renamed to this name once its replacement is in place.
_DISCARDED = "discarded"


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`. An existing `out_dir` is first set aside whole in a retired
    folder, so that a kill at any point leaves either output under a name the next build looks at."""
    if not out_dir.exists():
        staging.rename(out_dir)
        _sync_folder(out_dir.parent)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
    out_dir.rename(retired / out_dir.name)
    staging.rename(out_dir)
    _sync_folder(out_dir.parent)
    (retired / out_dir.name).rename(retired / _DISCARDED)
    shutil.rmtree(retired, ignore_errors=True)


def _recover_replaced_output(out_dir: Path) -> None:
    """Finish what a killed `--overwrite` left: the output it set aside is put back when `out_dir` is
    missing (the new one never got there), and removed otherwise (the new one did)."""
    for retired in _orphans(out_dir, "old"):
        kept = retired / out_dir.name
        if not os.path.lexists(out_dir) and _is_plain_folder(kept):
            kept.rename(out_dir)
            _sync_folder(out_dir.parent)
            warnings.warn(
                f"{out_dir}: put back the output that an interrupted --overwrite had moved to {retired.name}",
                RestoredOutputWarning,
                stacklevel=2,
            )
        _remove(retired)


def _resumable(staged: list[Path], fingerprint: str) -> Path | None:
    """The newest of `staged` whose journal records `fingerprint` (None when none has a journal).
    Each must be a folder `--resume` may write in; one staged from another plan is refused and kept."""
    recorded = {}
    for folder in sorted(staged, key=lambda folder: folder.lstat().st_mtime, reverse=True):
        _check_adoptable(folder)
        recorded[folder] = recorded_fingerprint(folder)
    matching = [folder for folder, staged_from in recorded.items() if staged_from == fingerprint]
    other = [folder for folder, staged_from in recorded.items() if staged_from not in (None, fingerprint)]
    if not matching and other:
        raise MergewiseError(
            f"--resume: {other[0]} was staged from another recipe, other inputs or another shard "
            "size; it was kept (merge again without --resume to replace it)"
        )
    return matching[0] if matching else None


def _check_adoptable(folder: Path) -> None:
    """Refuse a staging folder through which a resumed merge would write or hang outside it: it must
    be this user's own folder holding only regular files with no other link (no symlink, hard
    link, FIFO or folder)."""
    if not _is_plain_folder(folder) or folder.lstat().st_uid != os.geteuid():
        raise MergewiseError(
            f"--resume: {folder} is not a folder of this user's; remove it or merge again without --resume"
        )
    for entry in os.scandir(folder):
        status = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
            raise MergewiseError(
                f"--resume: {entry.path} is not a file the staged merge wrote (a symlink, hard link, "
                "FIFO or folder); merge again without --resume"
            )


def _orphans(out_dir: Path, kind: str) -> list[Path]:
    """Staging (`kind` "partial") or retired ("old") folders of `out_dir` whose process is gone. The
    lock is held, so one carrying this process's id is an orphan too (its id was reused)."""
    found = []
    for folder in out_dir.parent.glob(f".{out_dir.name}.{kind}-*-*"):
        pid = folder.name.removeprefix(f".{out_dir.name}.{kind}-").partition("-")[0]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            found.append(folder)
    return sorted(found)


def _is_plain_folder(path: Path) -> bool:
    """A folder, not a symlink to one."""
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    """Remove a folder with everything in it, or whatever else is at `path` (never following a symlink)."""
    if _is_plain_folder(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (files created, removed or renamed in it) to disk."""
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
        lock = _open_lock(lock_path)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise MergewiseError(f"another mergewise process is writing {out_dir}; wait for it to finish") from None
        held, current = os.fstat(lock), _lstat(lock_path)
        if current is not None and (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
            break
        os.close(lock)
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(lock)


def _open_lock(lock_path: Path) -> int:
    """A descriptor of the lock file, created if missing. Never through a symlink (that would create a
    file elsewhere), and only a regular file: opening a FIFO or a device does not wait, but is refused."""
    refused = MergewiseError(
        f"lock file {lock_path} is not a regular file (a symlink, FIFO, device or folder); remove it"
    )
    try:
        descriptor = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EISDIR):
            raise refused from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise refused
    return descriptor


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def write_model_config(
    folder: Path,
    config: dict,
    dtype: torch.dtype,
    source_layers: list[int] | None = None,
    vocab_size: int | None = None,
) -> None:
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
