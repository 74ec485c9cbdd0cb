"""The merge recipe: mergekit's YAML schema, read unchanged, plus mergewise's optional blocks.

mergekit's schema lets keys it does not know pass unused (a `name:` of a multi-stage card, a
`normalize:` written beside `merge_method`); so does this one, naming each in a RecipeWarning (an
error with `strict`), with the known key it most resembles. A source's `revision:` is read as the
model's revision. Parameter names are checked against the method's signature as the plan is made
(`mergewise.parameters.ParameterResolver`), before any tensor is read. The blocks (`aim:`,
`mediator:`) are mergewise's own: their schemas (`mergewise.stages.BLOCKS`) refuse unknown keys as the
recipe loads.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidatorFunctionWrapHandler,
    model_validator,
)

from mergewise import stages
from mergewise.checkpoint.files import read_yaml, validated
from mergewise.errors import MergewiseError, tolerated
from mergewise.methods import METHODS

Scalar = bool | int | float | str
MAX_RECIPE_BYTES = 1 << 20


class MergekitSchema(BaseModel):
    """A part of mergekit's schema. Keys it does not know pass, as they pass mergekit, and are kept
    aside (`ignored`) so that each can be named."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    _ignored: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_ignored_keys(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> MergekitSchema:
        if isinstance(data, dict):
            data = cls._read_extra_keys(data)
        validated = handler(data)
        if isinstance(data, dict) and isinstance(validated, cls):
            validated._ignored = {key: value for key, value in data.items() if key not in cls.model_fields}
        return validated

    @classmethod
    def _read_extra_keys(cls, data: dict) -> dict:
        """The entry with the extra keys mergewise honours folded into its fields."""
        return data

    @property
    def ignored(self) -> dict[str, Any]:
        return dict(self._ignored)


class ConditionalParameter(MergekitSchema):
    """`{filter: self_attn, value: 0.3}`: the value applies to tensors whose name contains filter."""

    value: Scalar | list[Scalar]
    filter: str | None = None


ParameterSetting = Scalar | list[Scalar] | ConditionalParameter | list[ConditionalParameter] | None
Parameters = dict[str, ParameterSetting]


class ModelEntry(MergekitSchema):
    """A model the recipe reads; a `revision:` beside it (which mergekit ignores) is read as the
    model's revision, `org/name@revision`."""

    model: str
    parameters: Parameters | None = None

    @classmethod
    def _read_extra_keys(cls, data: dict) -> dict:
        model, revision = data.get("model"), data.get("revision")
        if isinstance(model, str) and isinstance(revision, str) and revision and "@" not in model:
            name, plus, adapter = model.partition("+")
            return {**data, "model": f"{name}@{revision}{plus}{adapter}"}
        return data


class InputModel(ModelEntry):
    pass


class InputSlice(ModelEntry):
    layer_range: tuple[int, int]


class OutputSlice(MergekitSchema):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None


class OutputModule(MergekitSchema):
    """One part of a multimodal model (`text_decoder`, `vision_tower`, `multi_modal_projector`, as
    mergekit names them) merged from its own models, with its own parameters."""

    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> OutputModule:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices'")
        return self

    @property
    def first_model(self) -> str:
        """The model the module names first (of its models, else of its first slice)."""
        if self.models:
            return self.models[0].model
        assert self.slices is not None  # one of the two, checked as it loads
        return self.slices[0].sources[0].model


class ZeroEmbedding(MergekitSchema):
    """`{kind: zero}`: the token's rows are zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(MergekitSchema):
    """`{kind: model_token, model: X, token: Y}` (or `token_id`): the token's rows are those of token Y
    in model X's own vocabulary."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


def _source_kind(value: Any) -> str | None:
    """Which form a token's `source` takes, so that an error names that form's keys."""
    if isinstance(value, dict):
        return value.get("kind")
    return value.kind if isinstance(value, ZeroEmbedding | ModelTokenEmbedding) else "model"


TokenSource = Annotated[
    Annotated[ZeroEmbedding, Tag("zero")]
    | Annotated[ModelTokenEmbedding, Tag("model_token")]
    | Annotated[str, Tag("model")],
    Discriminator(_source_kind),
]


class TokenSettings(MergekitSchema):
    """Where one output token's embedding and head rows come from for models that lack it (all
    models with `force`); `source` a model path takes that model's rows of the same token."""

    source: TokenSource | None = None
    force: bool = False


class TokenizerSettings(MergekitSchema):
    """mergekit's `tokenizer:` block: the output vocabulary, per-token row sources, padding."""

    source: str = "union"
    tokens: dict[str, TokenSettings] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class MergeConfig(MergekitSchema):
    """A mergekit-compatible merge recipe (the blocks of a `Recipe` aside)."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> MergeConfig:
        if sum(map(bool, (self.models, self.slices, self.modules))) != 1:
            raise ValueError("give exactly one of 'models', 'slices' or 'modules'")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give at most one of 'tokenizer_source' or 'tokenizer' (its 'source')")
        return self

    @property
    def tokenizer_settings(self) -> TokenizerSettings | None:
        """The vocabulary the output gets, `tokenizer_source` read as a `tokenizer:` block with no
        per-token settings; None keeps the base's (else the first model's) tokenizer and tensors."""
        if self.tokenizer_source is not None:
            return TokenizerSettings(source=self.tokenizer_source)
        return self.tokenizer

    def model_paths(self) -> list[str]:
        """Every model the recipe reads, in first-mention order."""
        paths = [self.base_model] if self.base_model else []
        parts: list[MergeConfig | OutputModule] = [self, *(self.modules or {}).values()]
        for part in parts:
            for entry in part.models or []:
                paths.append(entry.model)
            for output_slice in part.slices or []:
                paths.extend(source.model for source in output_slice.sources)
                if output_slice.base_model:
                    paths.append(output_slice.base_model)
        return list(dict.fromkeys(paths))


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: the core merge, its validated blocks in stage order, and where it came from
    (relative paths are read from `config_dir`, the YAML file's folder, else the working folder)."""

    config: MergeConfig
    blocks: dict[str, BaseModel]
    config_dir: Path
    origin: str

    @property
    def base_model(self) -> str | None:
        """The model task vectors are measured from: the core's base_model, else a block's (Mediator
        keeps it for methods that take no base)."""
        carried = (
            getattr(block, "base_model", None)  # a block that carries it has the field
            for name, block in self.blocks.items()
            if stages.block_spec(name).carries_base_model
        )
        return self.config.base_model or next((base for base in carried if base), None)

    def record(self) -> dict:
        """The recipe as mergewise.yml records it."""
        return {
            **self.config.model_dump(mode="json", exclude_none=True),
            **{name: block.model_dump(mode="json", exclude_none=True) for name, block in self.blocks.items()},
        }


def load_recipe(
    source: str | Path | dict | MergeConfig | Recipe,
    *,
    config_dir: str | Path | None = None,
    origin: str = "config",
    strict: bool = False,
) -> Recipe:
    """Parse a recipe from a YAML path, a mapping, a MergeConfig or a Recipe (returned as it is); a
    mapping's relative paths are read from `config_dir` (default: the working folder), and its errors
    name `origin`. Keys mergekit would ignore are named in RecipeWarnings (errors with `strict`)."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, MergeConfig):
        return Recipe(source, {}, Path.cwd(), "config")
    if isinstance(source, dict):
        data, config_dir = dict(source), Path(config_dir or Path.cwd()).resolve()
    else:
        path = Path(source)
        data, origin, config_dir = read_yaml_mapping(path), str(path), path.parent.resolve()
    blocks = {}
    for name in stages.BLOCKS:
        if name not in data:
            continue
        spec = stages.block_spec(name)
        block = validate_block(spec.schema, data.pop(name), origin, name)
        if spec.rewrite_recipe is not None:
            data, block = spec.rewrite_recipe(data, block, origin)
        blocks[name] = block
    config = validate_config(data, origin)
    if config.modules and blocks:
        raise MergewiseError(
            f"{origin}: a merge of modules: takes no {' or '.join(f'{name}:' for name in blocks)} block yet; "
            "write the merge with models: to use it"
        )
    for message in ignored_key_messages(config, known_top_level=(*MergeConfig.model_fields, *stages.BLOCKS)):
        tolerated(f"{origin}: {message}", strict=strict)
    return Recipe(config, blocks, config_dir, origin)


def ignored_key_messages(config: MergeConfig, known_top_level: tuple[str, ...]) -> list[str]:
    """One sentence per key of the recipe that mergekit's schema lets pass unused."""
    method = METHODS.get(config.merge_method)
    messages = []
    for location, key, value, node in _ignored_keys(config):
        where = f"{location}.{key}" if location else key
        if location == "" and method is not None and key in method.parameters:
            messages.append(
                f"{key}: a parameter of {method.name} written at the top level is ignored, as mergekit "
                "ignores it; put it under parameters: to apply it"
            )
        elif key == "revision" and isinstance(node, ModelEntry) and f"@{value}" in node.model:
            messages.append(
                f"{where}: read as the model's revision ({node.model}); mergekit ignores it and reads "
                "the model's default revision"
            )
        else:
            known = known_top_level if location == "" else tuple(type(node).model_fields)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else _KEY_NOTES.get(key, "")
            messages.append(f"{where}: unknown key, ignored, as mergekit ignores it{hint}")
    return messages


# Why a recipe often holds a key that mergekit does not read.
_KEY_NOTES = {
    "name": " (it names one stage of a multi-stage recipe)",
    "layer_range": " (a layer range applies to slices: sources only)",
}


def _ignored_keys(node: Any, location: str = "") -> Iterator[tuple[str, str, Any, MergekitSchema]]:
    """(where, key, value, the entry holding it) of every key mergekit's schema lets pass unused."""
    if isinstance(node, MergekitSchema):
        for key, value in node.ignored.items():
            yield location, str(key), value, node
        for name in type(node).model_fields:
            yield from _ignored_keys(getattr(node, name), f"{location}.{name}" if location else name)
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            yield from _ignored_keys(item, f"{location}[{index}]")
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from _ignored_keys(item, f"{location}.{key}")


def read_yaml_mapping(path: Path) -> dict:
    """The top-level mapping of a recipe file, with YAML errors reported by file and position."""
    if not path.is_file():
        raise MergewiseError(f"config file not found: {path}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise MergewiseError(
            f"{path}: {path.stat().st_size} bytes; a recipe over {MAX_RECIPE_BYTES} bytes is refused "
            "(YAML that large is not a recipe, and parsing it takes minutes)"
        )
    data = read_yaml(path, "recipe", max_bytes=MAX_RECIPE_BYTES)
    if not isinstance(data, dict):
        raise MergewiseError(f"{path}: expected a mapping with merge_method and models/slices")
    return data


def validate_config(data: dict, origin: str) -> MergeConfig:
    return validate_block(MergeConfig, data, origin)


Block = TypeVar("Block", bound=BaseModel)


def validate_block(schema: type[Block], data: Any, origin: str, key: str = "") -> Block:
    """Validate one recipe block; the first problem becomes one error naming the file and key path."""
    return validated(schema, data, origin, key)
