"""How to run a merge, declared once: the engine takes a `MergeOptions`, and every command that runs
a merge makes its flags from the fields that carry a `help` (commands/merge.py). Torch-free, so the
command line builds its parser before torch loads."""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields

from mergewise.chunking import CHUNK_ELEMENTS

# Row chunks at least this large run through a torch.compile'd method: the fused kernel makes one
# pass instead of one per operation. Smaller tensors are not worth the compilation.
COMPILE_MIN_ELEMENTS = 1 << 18


def _flag(help: str, kind: type = str) -> dict:
    """A field's command-line flag: its help, and the type of its value (bool: an on/off switch)."""
    return {"help": help, "kind": kind}


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (not what to merge): these never change the result, except `seed` and
    `chunk_elements` (random methods draw their masks per row chunk)."""

    device: str = field(default="cpu", metadata=_flag("where the arithmetic runs: cpu or cuda[:N]"))
    # None: torch's thread count as the caller set it (the command line gives all cores)
    threads: int | None = field(default=None, metadata=_flag("CPU threads (default: all cores)", int))
    shard_size: str | int = field(default="5GB", metadata=_flag("largest output shard, e.g. 5GB or 500MB"))
    allow_pickle: bool = field(
        default=False, metadata=_flag("accept pytorch_model*.bin inputs (loaded with weights_only=True)", bool)
    )
    overwrite: bool = field(default=False, metadata=_flag("replace OUT_DIR if it exists", bool))
    seed: int | None = field(default=None, metadata=_flag("seed of random methods (DARE, DELLA)", int))
    quiet: bool = field(default=False, metadata=_flag("no progress bar", bool))
    compile: bool | None = field(
        default=None,
        metadata=_flag(  # None: only for big models
            "fuse the arithmetic with torch.compile (default: only for models of 2B+ parameters)", bool
        ),
    )
    model_card: bool = field(
        default=True, metadata=_flag("do not write README.md (a model card with Hub metadata and the recipe)", bool)
    )
    resume: bool = field(
        default=False,
        metadata=_flag(  # build on the staged output of a killed merge
            "continue a killed merge into OUT_DIR: keep its finished shards, compute the rest", bool
        ),
    )
    strict: bool = field(
        default=False,
        metadata=_flag(
            "NaN or infinity in a merged tensor, and recipe keys mergekit ignores, are errors (default: a warning "
            "naming each)",
            bool,
        ),
    )
    chunk_elements: int = CHUNK_ELEMENTS  # elements of a row chunk (every input's, every stage's)
    compile_min_elements: int = COMPILE_MIN_ELEMENTS  # the smallest row chunk that runs compiled

    @classmethod
    def flags(cls) -> list[Field]:
        """The fields that are command-line flags, in declaration order."""
        return [option for option in fields(cls) if "help" in option.metadata]
