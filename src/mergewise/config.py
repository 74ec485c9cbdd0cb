"""The merge recipe: mergekit's YAML schema, read unchanged, plus mergewise's optional blocks.

Method names and parameter names are checked against the method's signature when the config loads,
so a typo fails before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergewise.errors import MergewiseError

Scalar = Union[bool, int, float, str]


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


class MergeConfig(BaseModel):
    """A mergekit-compatible merge recipe. `aim` and `mediator` are read by their own packages."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    aim: dict[str, Any] | None = None
    mediator: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> "MergeConfig":
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices'")
        return self

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


def load_config(source: str | Path | dict | MergeConfig) -> tuple[MergeConfig, Path]:
    """Parse a recipe from a YAML path, a dict or a MergeConfig; also return the folder that
    relative model paths are resolved against (the YAML file's folder, else the working folder)."""
    if isinstance(source, MergeConfig):
        return source, Path.cwd()
    if isinstance(source, dict):
        return validate_config(source, "config"), Path.cwd()
    path = Path(source)
    return validate_config(read_yaml_mapping(path), str(path)), path.parent.resolve()


def read_yaml_mapping(path: Path) -> dict:
    """The top-level mapping of a recipe file, with YAML errors reported by file and position."""
    if not path.is_file():
        raise MergewiseError(f"config file not found: {path}")
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
