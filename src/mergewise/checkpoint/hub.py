"""Models named by their Hugging Face Hub id (`org/name`, `org/name@revision`), as most published
recipes name them: resolved into the normal Hugging Face cache, downloading only the files a merge
reads. `HF_HUB_OFFLINE=1` and a warm cache need no network."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergewise.errors import MergewiseError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
WEIGHTS = ("*.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def is_hub_id(reference: str) -> bool:
    return HUB_ID.match(reference) is not None


def hub_snapshot(reference: str, key: str, files: tuple[str, ...], *, allow_pickle: bool = False) -> Path:
    """The cached snapshot folder of Hub model `reference` (downloaded first when missing), holding
    its weights and `files`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    match = HUB_ID.match(reference)
    assert match is not None, reference  # callers take only what is_hub_id accepts
    repo, revision = match["repo"], match["revision"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    patterns = [*WEIGHTS, *(PICKLED_WEIGHTS if allow_pickle else ()), "config.json", *files]
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=patterns,
            local_files_only=offline,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except RevisionNotFoundError:
        raise MergewiseError(f"{key}: {reference}: the Hub repository {repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise MergewiseError(
            f"{key}: {reference}: no such model on the Hugging Face Hub (or it is private: log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise MergewiseError(
            f"{key}: {reference}: not in the Hugging Face cache, and {where}; download it first or give a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise MergewiseError(f"{key}: {reference}: cannot download it from the Hub ({str(error)[:200]})") from None
    return Path(folder)


def revision_of(folder: Path) -> str | None:
    """The commit a cached snapshot folder holds (`…/models--org--name/snapshots/<commit>`)."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.name
    return None
