"""Models named by their Hugging Face Hub id (`org/name`, `org/name@revision`), as most published
recipes name them: resolved into the normal Hugging Face cache, downloading only the files a merge
reads, and the weights only once the merge is planned: config, tokenizer and index files come
first, the safetensors headers are read with ranged requests, so a recipe that cannot work fails
having fetched kilobytes. `HF_HUB_OFFLINE=1` and a warm cache need no network."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergewise.checkpoint.files import read_json
from mergewise.checkpoint.reader import (
    SAFETENSORS_INDEX,
    TensorInfo,
    WeightIndex,
    parse_safetensors_header,
    read_safetensors_header,
)
from mergewise.errors import MergewiseError

if TYPE_CHECKING:
    from huggingface_hub import DryRunFileInfo

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
WEIGHTS = ("*.safetensors", SAFETENSORS_INDEX)
PICKLED_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def is_hub_id(reference: str) -> bool:
    return HUB_ID.match(reference) is not None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _repo_and_revision(reference: str) -> tuple[str, str | None]:
    match = HUB_ID.match(reference)
    assert match is not None, reference  # callers take only what is_hub_id accepts
    return match["repo"], match["revision"]


@contextmanager
def _hub_errors(reference: str, key: str) -> Iterator[None]:
    """The Hub's failures as one error line naming the recipe key and the model."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = _repo_and_revision(reference)
    try:
        yield
    except RevisionNotFoundError:
        raise MergewiseError(f"{key}: {reference}: the Hub repository {repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise MergewiseError(
            f"{key}: {reference}: no such model on the Hugging Face Hub (or it is private: log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
        raise MergewiseError(
            f"{key}: {reference}: not in the Hugging Face cache, and {where}; download it first or give a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise MergewiseError(f"{key}: {reference}: cannot download it from the Hub ({str(error)[:200]})") from None


def _snapshot(
    repo: str, revision: str | None, patterns: list[str], *, local_files_only: bool = False, quiet: bool = False
) -> Path:
    """The snapshot folder with the files matching `patterns` (a progress bar unless `quiet`)."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=local_files_only,
            tqdm_class=_silent_tqdm() if quiet else None,
        )
    )


def _listing(repo: str, revision: str | None, patterns: list[str]) -> list[DryRunFileInfo]:
    """The files of a Hub snapshot matching `patterns`: commit, size and whether each is cached."""
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or None
    return snapshot_download(
        repo, revision=revision, allow_patterns=patterns, cache_dir=cache, dry_run=True, tqdm_class=_silent_tqdm()
    )


def _silent_tqdm() -> type:
    """A progress bar that shows nothing: listing files and fetching kilobytes needs none."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **{**kwargs, "disable": True})

    return Silent


def hub_snapshot(reference: str, key: str, files: tuple[str, ...], *, allow_pickle: bool = False) -> Path:
    """The cached snapshot folder of Hub model `reference` (downloaded first when missing), holding
    its weights and `files`."""
    repo, revision = _repo_and_revision(reference)
    patterns = [*WEIGHTS, *(PICKLED_WEIGHTS if allow_pickle else ()), "config.json", *files]
    with _hub_errors(reference, key):
        return _snapshot(repo, revision, patterns, local_files_only=_offline())


def hub_model(
    reference: str, key: str, files: tuple[str, ...], *, allow_pickle: bool = False
) -> tuple[Path, HubWeights | None]:
    """The cached snapshot folder of Hub model `reference` with its config, index and `files`, and its
    safetensors weights not in the cache yet (None: none missing), to be planned from their headers and
    downloaded after. Offline, or with pickled weights (no header to plan from), the whole snapshot
    comes at once, as `hub_snapshot` brings it."""
    if _offline():
        return hub_snapshot(reference, key, files, allow_pickle=allow_pickle), None
    from huggingface_hub.errors import DryRunError

    repo, revision = _repo_and_revision(reference)
    with _hub_errors(reference, key):
        try:
            listing = _listing(repo, revision, [*WEIGHTS, *PICKLED_WEIGHTS, "config.json", *files])
        except DryRunError:  # unreachable, unknown or private: the cache, or the reason, as a download finds them
            return hub_snapshot(reference, key, files, allow_pickle=allow_pickle), None
        small = [entry.filename for entry in listing if not entry.filename.endswith((".safetensors", ".bin"))]
        # by the recipe's revision, so that the cache records which commit it names (found again
        # offline); the weights then come from that very commit
        folder = _snapshot(repo, revision, small or ["config.json"], quiet=True)
    commit = folder.name
    weights = {entry.filename: entry for entry in listing if entry.filename.endswith(".safetensors")}
    if (folder / SAFETENSORS_INDEX).is_file():
        index = read_json(folder / SAFETENSORS_INDEX, "weight index", folder=folder, schema=WeightIndex)
        weights = {name: entry for name, entry in weights.items() if name in set(index.weight_map.values())}
    elif "model.safetensors" in weights:
        weights = {"model.safetensors": weights["model.safetensors"]}
    if not weights:  # pickled weights, or none (the folder then says which)
        return hub_snapshot(reference, key, files, allow_pickle=allow_pickle), None
    missing = {name: entry.file_size or 0 for name, entry in weights.items() if not entry.is_cached}
    if not missing:
        return folder, None
    return folder, HubWeights(reference, key, repo, commit, folder, tuple(sorted(weights)), missing)


HEADER_PREFETCH = 1 << 17  # bytes of a safetensors file asked for first: most headers fit


class _RangedFile:
    """A file on the Hub read by byte ranges; the first request asks for HEADER_PREFETCH bytes and
    later reads inside them are answered from memory."""

    def __init__(self, url: str, reference: str, key: str):
        self.url, self.reference, self.key = url, reference, key
        self.size = 0
        self._first = b""

    def read(self, offset: int, length: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        if offset + length <= len(self._first):
            return self._first[offset : offset + length]
        wanted = f"bytes={offset}-{offset + max(length, HEADER_PREFETCH) - 1}"
        with _hub_errors(self.reference, self.key):
            response = get_session().get(self.url, headers={**build_hf_headers(), "Range": wanted})
            hf_raise_for_status(response)
        if response.status_code == 200:  # the server sent the whole file
            self.size, self._first = len(response.content), response.content
            return response.content[offset : offset + length]
        self.size = int(response.headers.get("Content-Range", "/0").rpartition("/")[2] or 0)
        if offset == 0:
            self._first = response.content
        return response.content[:length]


@dataclass
class HubWeights:
    """Safetensors weight files of a Hub model at one commit, not yet in the cache: `tensors` reads
    their headers with ranged requests; `download` brings the files into the snapshot folder."""

    reference: str
    key: str
    repo: str
    commit: str
    folder: Path
    files: tuple[str, ...]  # every weight file of the model
    missing: dict[str, int]  # the ones to download, with their sizes

    @property
    def nbytes(self) -> int:
        return sum(self.missing.values())

    def tensors(self) -> dict[str, TensorInfo]:
        from huggingface_hub import hf_hub_url

        found: dict[str, TensorInfo] = {}
        for name in self.files:
            local = self.folder / name
            if name in self.missing:
                remote = _RangedFile(hf_hub_url(self.repo, name, revision=self.commit), self.reference, self.key)
                remote.read(0, 8)  # learns the file's size
                infos = parse_safetensors_header(local, remote.size, remote.read, label=f"{self.reference} ({name})")
            else:
                infos = read_safetensors_header(local)
            found.update((info.name, info) for info in infos)
        return found

    def download(self) -> None:
        with _hub_errors(self.reference, self.key):
            _snapshot(self.repo, self.commit, list(self.missing))
