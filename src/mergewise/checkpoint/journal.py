"""What a staged output holds for certain, so that a killed merge can be resumed (`--resume`).

The journal sits in the staging folder: the fingerprint of the plan it is built from (recipe,
input files, shard layout, version), the seed, and each finished shard with its SHA-256. A resumed
merge keeps the shards whose hashes still verify and computes the rest; the random methods draw
the same masks, since the seed is the recorded one.

The journal is the last file removed from a staging folder, once everything else is on disk: a
staging folder without one is never built on.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Annotated

from pydantic import Field
from typing_extensions import TypedDict  # pydantic reads typing's only from Python 3.12

from mergewise.checkpoint.files import read_json
from mergewise.errors import MergewiseError

JOURNAL_FILE = ".mergewise-progress.json"
ShardName = Annotated[str, Field(pattern=r"^[\w.-]+\.safetensors$")]  # a file of the staging folder, never a path
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ProgressRecord(TypedDict):
    """The journal as `Journal._save` writes it."""

    fingerprint: str
    seed: Annotated[int, Field(strict=True)]
    finished: dict[ShardName, Digest]


class Journal:
    def __init__(
        self,
        staging: Path,
        fingerprint: str,
        seed: int,
        shards: dict[str, list[str]],
        finished: dict[str, str] | None = None,
    ):
        self.path = staging / JOURNAL_FILE
        self.fingerprint = fingerprint
        self.seed = seed
        self.finished = dict(finished or {})
        self._remaining = {file: set(names) for file, names in shards.items() if file not in self.finished}
        self._shard_of = {name: file for file, names in shards.items() for name in names}
        self._lock = threading.Lock()
        self._save()

    @staticmethod
    def resumed(staging: Path) -> tuple[int, dict[str, str]] | None:
        """(seed, the finished shards whose files still hash as recorded) of a staged output that
        staged_folder adopted for the same plan; None when there is no journal there (a new staging
        folder). Its other files are removed: the resumed merge writes each of them again."""
        record = _record(staging)
        if record is None:
            return None
        _, seed, finished = record
        verified = {
            file: digest
            for file, digest in finished.items()
            if (staging / file).is_file() and _sha256(staging / file) == digest
        }
        for path in staging.iterdir():
            if path.name not in verified and path.name != JOURNAL_FILE:
                path.unlink()
        return seed, verified

    def tensor_written(self, name: str) -> None:
        """Called once every row of `name` is on file; a shard whose tensors are all written is
        hashed and recorded, but the last one: the merge is done then, and hashing it would only
        delay the output."""
        file = self._shard_of[name]
        with self._lock:
            remaining = self._remaining.get(file)
            if remaining is None:
                return
            remaining.discard(name)
            if remaining:
                return
            del self._remaining[file]
            if not self._remaining:
                return
        digest = _sha256(self.path.parent / file)
        with self._lock:
            self.finished[file] = digest
            self._save()

    def _save(self) -> None:
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps({"fingerprint": self.fingerprint, "seed": self.seed, "finished": self.finished}))
        os.replace(partial, self.path)


def recorded_fingerprint(staging: Path) -> str | None:
    """The fingerprint of the plan a staged output was built from; None when it has no journal."""
    record = _record(staging)
    return record[0] if record is not None else None


def _record(staging: Path) -> tuple[str, int, dict[str, str]] | None:
    """(fingerprint, seed, finished shards) of a staged output's journal; None when it has none."""
    path = staging / JOURNAL_FILE
    if not path.is_file():
        return None
    try:
        data = read_json(path, "progress record", schema=ProgressRecord)
    except MergewiseError as error:
        raise MergewiseError(f"{error}; merge again without --resume") from None
    return data["fingerprint"], data["seed"], dict(data["finished"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
