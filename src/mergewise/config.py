"""The merge recipe: mergekit's YAML schema, read unchanged, plus mergewise's optional blocks.

Method names and parameter names are checked against the method's signature when the config loads,
so a typo fails before any tensor is read. The blocks (`aim:`, `mediator:`) are validated by their
own schemas (`mergewise.stages.BLOCKS`) as the recipe loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from mergewise.errors import MergewiseError

Scalar = Union[bool, int, float, str]
MAX_RECIPE_BYTES = 1 << 20


class ConditionalParameter(BaseModel):
    """`{filter: self_attn, value: 0.3}`: the value applies to tensors whose name contains filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


ParameterSetting = Union[Scalar, list[Scalar], ConditionalParameter, list[ConditionalParameter], None]
Parameters = dict[str, ParameterSetting]


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    parameters: Parameters | None = None


class InputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None


class ZeroEmbedding(BaseModel):
    """`{kind: zero}`: the token's rows are zeros."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """`{kind: model_token, model: X, token: Y}` (or `token_id`): the token's rows are those of token Y
    in model X's own vocabulary."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_token(self) -> "ModelTokenEmbedding":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


def _source_kind(value: Any) -> str | None:
    """Which form a token's `source` takes, so that an error names that form's keys."""
    if isinstance(value, dict):
        return value.get("kind")
    return value.kind if isinstance(value, BaseModel) else "model"


TokenSource = Annotated[Union[Annotated[ZeroEmbedding, Tag("zero")], Annotated[ModelTokenEmbedding, Tag("model_token")],
                              Annotated[str, Tag("model")]], Discriminator(_source_kind)]


class TokenSettings(BaseModel):
    """Where one output token's embedding and head rows come from for models that lack it (all
    models with `force`); `source` a model path takes that model's rows of the same token."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: TokenSource | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's `tokenizer:` block: the output vocabulary, per-token row sources, padding."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = "union"
    tokens: dict[str, TokenSettings] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class MergeConfig(BaseModel):
    """A mergekit-compatible merge recipe (the blocks of a `Recipe` aside)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> "MergeConfig":
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices'")
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
        for entry in self.models or []:
            paths.append(entry.model)
        for output_slice in self.slices or []:
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
        return self.config.base_model or next(
            (block.base_model for block in self.blocks.values() if getattr(block, "base_model", None)), None)

    def record(self) -> dict:
        """The recipe as mergewise.yml records it."""
        return {**self.config.model_dump(mode="json", exclude_none=True),
                **{name: block.model_dump(mode="json", exclude_none=True) for name, block in self.blocks.items()}}


def load_recipe(source: str | Path | dict | MergeConfig | Recipe, *, config_dir: str | Path | None = None,
                origin: str = "config") -> Recipe:
    """Parse a recipe from a YAML path, a mapping, a MergeConfig or a Recipe (returned as it is); a
    mapping's relative paths are read from `config_dir` (default: the working folder), and its errors
    name `origin`."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, MergeConfig):
        return Recipe(source, {}, Path.cwd(), "config")
    if isinstance(source, dict):
        data, config_dir = dict(source), Path(config_dir or Path.cwd()).resolve()
    else:
        path = Path(source)
        data, origin, config_dir = read_yaml_mapping(path), str(path), path.parent.resolve()
    from mergewise.stages import BLOCKS, block_spec

    blocks = {}
    for name in BLOCKS:
        if name not in data:
            continue
        spec = block_spec(name)
        block = validate_block(spec.schema, data.pop(name), origin, name)
        if spec.rewrite_recipe is not None:
            data, block = spec.rewrite_recipe(data, block, origin)
        blocks[name] = block
    return Recipe(validate_config(data, origin), blocks, config_dir, origin)


def read_yaml_mapping(path: Path) -> dict:
    """The top-level mapping of a recipe file, with YAML errors reported by file and position."""
    if not path.is_file():
        raise MergewiseError(f"config file not found: {path}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise MergewiseError(f"{path}: {path.stat().st_size} bytes; a recipe over {MAX_RECIPE_BYTES} bytes is refused "
                             "(YAML that large is not a recipe, and parsing it takes minutes)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MergewiseError(f"{path}: invalid YAML ({str(error).splitlines()[0]} "
                             f"{_yaml_position(error)})") from None
    if not isinstance(data, dict):
        raise MergewiseError(f"{path}: expected a mapping with merge_method and models/slices")
    return data


def _yaml_position(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f"at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def validate_config(data: dict, origin: str) -> MergeConfig:
    return validate_block(MergeConfig, data, origin)


Block = TypeVar("Block", bound=BaseModel)


def validate_block(schema: type[Block], data: Any, origin: str, key: str = "") -> Block:
    """Validate one recipe block; the first problem becomes one error naming the file and key path."""
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in (key, *first["loc"]) if part != "") or "(top level)"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise MergewiseError(f"{origin}: {location}: {message}") from None
