"""Where a recipe's model references are: a local folder (beside the recipe, else in the working
folder), a Hub snapshot, or mergekit's `model+adapter`; one `ModelFolder` per folder, however the
recipe spells it."""

from __future__ import annotations

from pathlib import Path

from mergewise.checkpoint import TOKENIZER_FILES, ModelFolder
from mergewise.checkpoint.hub import HubWeights, hub_model, hub_snapshot, is_hub_id
from mergewise.checkpoint.lora import ADAPTER_FILES, AdaptedFolder
from mergewise.errors import MergewiseError, tolerated


class ModelLocator:
    """The model folders of one recipe, opened once each."""

    def __init__(self, config_dir: Path, *, allow_pickle: bool = False, strict: bool = False):
        self.config_dir = config_dir
        self.allow_pickle = allow_pickle
        self.strict = strict
        self._models: dict[str, ModelFolder] = {}  # by reference, as the recipe spells it
        self._folders: dict[tuple[Path, Path | None], ModelFolder] = {}  # by (folder, adapter folder)
        self._pending: dict[Path, HubWeights] = {}  # Hub weights located, not yet downloaded

    @property
    def folders(self) -> list[ModelFolder]:
        """Every folder opened so far, in the order first named."""
        return list(self._folders.values())

    def model(self, reference: str, key: str) -> ModelFolder:
        """The folder a reference names: one object per folder (and adapter), however it is spelled."""
        if reference not in self._models:
            model, plus, adapter = reference.partition("+")
            location: tuple[Path, Path | None]
            if plus and not self._exists(reference):  # mergekit's model+adapter: a PEFT LoRA on the model
                location = (self._locate(model, key), self._locate(adapter, f"{key} (adapter)", ADAPTER_FILES))
            else:
                location = (self._locate(reference, key), None)
            if location not in self._folders:
                pending = self._pending.pop(location[0], None)
                folder = (
                    AdaptedFolder(*location, allow_pickle=self.allow_pickle, pending=pending)
                    if location[1] is not None
                    else ModelFolder(location[0], allow_pickle=self.allow_pickle, pending=pending)
                )
                folder.reference = reference
                self._folders[location] = folder
            self._models[reference] = self._folders[location]
        return self._models[reference]

    def candidates(self, reference: str) -> list[Path]:
        return folder_candidates(reference, self.config_dir)

    def _exists(self, reference: str) -> bool:
        return any(candidate.is_dir() for candidate in self.candidates(reference))

    def _locate(self, reference: str, key: str, files: tuple[str, ...] = TOKENIZER_FILES) -> Path:
        """A local folder (relative to the recipe's folder, else the working folder), else a Hub id
        resolved through the Hugging Face cache."""
        for candidate in self.candidates(reference):
            if candidate.is_dir():
                return candidate.resolve()
        path, at, revision = reference.rpartition("@")
        if at and self._exists(path):
            tolerated(
                f"{key}: {path} is a local folder; its revision {revision!r} is ignored, as mergekit ignores it",
                strict=self.strict,
            )
            return self._locate(path, key, files)
        if is_hub_id(reference) and files == ADAPTER_FILES:  # read whole as it opens, a few megabytes
            return hub_snapshot(reference, key, files, allow_pickle=self.allow_pickle)
        if is_hub_id(reference):
            folder, pending = hub_model(reference, key, files, allow_pickle=self.allow_pickle)
            if pending is not None:
                self._pending[folder] = pending
            return folder
        raise MergewiseError(
            f"{key}: model folder not found: {reference} (a local folder, or a Hub id "
            "such as org/name or org/name@revision)"
        )


def folder_candidates(reference: str, config_dir: Path) -> list[Path]:
    """Where a recipe's model reference may be a local folder: the recipe's folder first, then the working folder."""
    path = Path(reference).expanduser()
    return [path] if path.is_absolute() else [config_dir / path, Path.cwd() / path]


def is_remote(reference: str, config_dir: Path) -> bool:
    """Whether a merge would download a model reference (or the adapter of `model+adapter`) from the Hub."""

    def local(name: str) -> bool:
        return any(candidate.is_dir() for candidate in folder_candidates(name, config_dir))

    if local(reference):
        return False
    return any(is_hub_id(part) and not local(part.rpartition("@")[0] or part) for part in reference.split("+"))
