"""Recipe blocks beyond mergekit's schema (`aim:`, `mediator:`) as stages of the one streaming merge.

A block is a package holding a pydantic schema and a `Stage`, named in `BLOCKS`. Whoever starts a
merge (`mergewise.merge`, the CLI, `mediator build`, a benchmark) runs the same engine, which calls
every stage of the recipe through the same hooks, in `BLOCKS` order:

    on_plan(context)            once, before any tensor: calibrate, analyse, lay out extra files
    on_rows(job, rows, merged)  every merged row chunk, with the input rows already read (base too);
                                returns the rows to write
    on_tensor(job, read)        every finished tensor the stage asked for (`wants_tensor`): `read(rows)`
                                reads those rows back from the staged output (`read()`: all of it),
                                so neither a stage nor the engine holds a whole tensor
    finalize(staging)           the staged folder, complete but not yet in place; what it returns is
                                the stage's result (in `MergeResult.records` and mergewise.yml)
    close()                     always, last: release what the stage holds

The core never imports a block's package: `BLOCKS` names each one's module, imported when a recipe
uses the block. Adding a block is one package exposing `BLOCK` plus one line here; what a block
supports is declared in its `BlockSpec`, which the engine, the recipe and the search read (never a
block's name).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from pydantic import BaseModel

from mergewise.chunking import CHUNK_ELEMENTS

if TYPE_CHECKING:  # types only: the recipe (config) reads BLOCKS as it loads
    from mergewise.config import Recipe
    from mergewise.methods import TensorRows
    from mergewise.plan import MergePlan, TensorJob

Settings = TypeVar("Settings", bound=BaseModel)

# Block name → module exposing `BLOCK: BlockSpec`, in the order their stages run (AIM relaxes the
# merged tensors before Mediator reads them).
BLOCKS = {"aim": "mergewise.aim.stage", "mediator": "mergewise.mediator.stage"}


@dataclass(frozen=True)
class StageContext:
    """What a stage may look at before the first tensor."""

    plan: MergePlan
    device: torch.device
    staging: Path  # the output folder being built
    shard_size: int
    quiet: bool
    chunk_elements: int = CHUNK_ELEMENTS  # the row chunks a stage reads its own inputs in


class Stage:
    """A recipe block's part in the merge; every hook is optional."""

    name = ""

    def inputs(self) -> list[Path]:
        """The files and folders the stage reads besides the recipe's models: the output must
        neither be nor hold any of them."""
        return []

    def on_plan(self, context: StageContext) -> None:
        pass

    def on_rows(self, job: TensorJob, rows: TensorRows, merged: torch.Tensor) -> torch.Tensor:
        return merged

    def wants_tensor(self, job: TensorJob) -> bool:
        return False

    def on_tensor(self, job: TensorJob, read: Callable[[slice | None], torch.Tensor]) -> None:
        pass

    def finalize(self, staging: Path) -> Any:
        return None

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class BlockSpec(Generic[Settings]):
    """A recipe block: its schema, its stage, (optionally) how it rewrites the core recipe before that
    is validated (Mediator lists its models under `mediator.experts`), and what it supports."""

    schema: type[Settings]
    make_stage: Callable[[Settings, Recipe], Stage]
    rewrite_recipe: Callable[[dict, Settings, str], tuple[dict, Settings]] | None = None
    # A killed merge of a recipe with the block may be finished with --resume.
    resumable: bool = True
    # Its stage works on a merge whose embeddings and heads are re-indexed into a new vocabulary
    # (`tokenizer_source`, `tokenizer:`); one that reads the inputs' rows as stored does not.
    reindexed_vocabulary: bool = False
    # The block's `base_model` is the recipe's base model where the core recipe names none (Mediator
    # keeps it for merge methods that take no base).
    carries_base_model: bool = False
    # Settings a search may not vary: they decide the inputs, not the merge (AIM calibrates once).
    fixed_keys: tuple[str, ...] = ()


def block_spec(name: str) -> BlockSpec[Any]:
    return importlib.import_module(BLOCKS[name]).BLOCK


def recipe_stages(recipe: Recipe) -> list[Stage]:
    """The stages of a recipe's blocks, in `BLOCKS` order."""
    return [block_spec(name).make_stage(block, recipe) for name, block in recipe.blocks.items()]
