"""A search recipe: a normal recipe in which numeric values may be search spaces, plus `search:`.

    models:
      - model: ./zoo/expert-first
        parameters: {weight: {search: uniform, low: 0.2, high: 1.0}, density: {search: choice, values: [0.3, 0.5]}}
    aim: {omega: {search: uniform, low: 0.2, high: 1.0, default: 0.4}, calibration: {...}}

Each space is named by its dotted path (`models.0.parameters.weight`, `aim.omega`): the name of its
column in trials.csv and of its key in the searcher. A space's `default` is the value of the baseline
recipe the search is compared with; without it, the key's own default where it has one, else the
space's centre.
"""

from __future__ import annotations

import copy
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from mergewise import stages
from mergewise.config import read_yaml_mapping, validate_block
from mergewise.errors import MergewiseError
from mergewise.methods.registry import get_method

SPACE_KINDS = ("uniform", "loguniform", "int", "choice")
MAX_GRID_POINTS = 10_000  # trials of a grid search; each one is a merge and a scoring run
PARAMETER_MAPS = (
    ("parameters",),
    ("models", int, "parameters"),
    ("slices", int, "parameters"),
    ("slices", int, "sources", int, "parameters"),
)


class LmEvalObjective(BaseModel):
    """Score with lm-eval-harness tasks: the mean of each task's first metric."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1)
    include_path: str | None = None  # a folder of task YAML files (local tasks)
    test_tasks: list[str] | None = None  # scored once, for the best and the baseline recipe
    batch_size: int = Field(16, ge=1)


class Objective(BaseModel):
    """What a trial is scored on: a zoo's validation prompts (the weighted mean over tasks of each
    one's metric, over the first `limit` prompts of each), or lm-eval tasks. `metric: task` is the
    task's own (exact match; minus the answer NLL for `nll` tasks); `answer_nll`, minus the answer's
    NLL per token, is smoother when few prompts are scored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    zoo: str | None = None
    tasks: dict[str, float] | None = None
    metric: Literal["task", "answer_nll"] = "task"
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    lm_eval: LmEvalObjective | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Objective:
        if (self.zoo is None) == (self.lm_eval is None):
            raise ValueError("give either zoo (with tasks) or lm_eval")
        if self.zoo is not None and not self.tasks:
            raise ValueError("a zoo objective names its tasks and their weights")
        return self


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)


class SearchSettings(BaseModel):
    """The `search:` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    trials: int = Field(32, ge=1)
    searcher: Literal["optuna", "cmaes", "random", "grid"] = "optuna"
    objective: Objective
    keep: int = Field(2, ge=1)
    resources: Resources = Resources()
    seed: int = 0


@dataclass(frozen=True)
class Space:
    """One searched value."""

    name: str  # dotted path in the recipe
    path: tuple[str | int, ...]
    kind: str
    low: float  # a choice space's: its smallest value
    high: float  # …and its largest
    values: tuple[float, ...]
    default: float | None  # the baseline value; where the recipe gives none, `load_search_recipe` fills it in

    def grid(self) -> list[float]:
        return list(self.values) if self.kind == "choice" else list(range(int(self.low), int(self.high) + 1))

    def grid_size(self) -> int:
        """The values `grid` lists, counted without listing them."""
        if self.kind == "choice":
            return len(self.values)
        if self.kind == "int":
            return int(self.high) - int(self.low) + 1
        raise MergewiseError(f"search.searcher: grid needs choice or int spaces; {self.name} is {self.kind}")


@dataclass(frozen=True)
class SearchRecipe:
    """The recipe with its spaces taken out, where it came from, and the search settings."""

    template: dict
    spaces: tuple[Space, ...]
    settings: SearchSettings
    config_dir: Path
    origin: str

    def concrete(self, values: dict[str, Any]) -> dict:
        """The recipe with every space replaced by its value in `values`."""
        recipe = copy.deepcopy(self.template)
        for space in self.spaces:
            value = values[space.name]
            _set(recipe, space.path, int(value) if space.kind == "int" else float(value))
        return recipe

    def baseline(self) -> dict[str, float]:
        baseline = {}
        for space in self.spaces:
            assert space.default is not None  # filled in by load_search_recipe
            baseline[space.name] = space.default
        return baseline


def load_search_recipe(path: str | Path) -> SearchRecipe:
    """Read SEARCH.yml; every problem is one error naming the file and the key."""
    path = Path(path)
    data = read_yaml_mapping(path)
    origin = str(path)
    if "search" not in data:
        raise MergewiseError(f"{origin}: search: missing (the block that says how many trials and what to score)")
    settings = validate_block(SearchSettings, data.pop("search"), origin, "search")
    found: list[Space] = []
    _collect_spaces(data, (), found, origin)
    if not found:
        raise MergewiseError(f"{origin}: no search space (write a value as {{search: uniform, low: …, high: …}})")
    method = data.get("merge_method")
    template = _template(data, found)
    for space in found:
        _check_numeric_key(space, method, origin)
    spaces = tuple(_with_default(space, method) for space in found)
    if settings.searcher == "grid":
        points = math.prod(space.grid_size() for space in spaces)
        if points > MAX_GRID_POINTS:
            raise MergewiseError(
                f"{origin}: search.searcher: grid runs every combination of the spaces, here {points} "
                f"trials; at most {MAX_GRID_POINTS} (narrow the spaces, or use another searcher)"
            )
    return SearchRecipe(template, spaces, settings, path.parent.resolve(), origin)


def _collect_spaces(node: Any, path: tuple, spaces: list[Space], origin: str) -> None:
    if isinstance(node, dict) and "search" in node:
        spaces.append(_parse_space(node, path, origin))
    elif isinstance(node, dict):
        for key, value in node.items():
            _collect_spaces(value, (*path, key), spaces, origin)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _collect_spaces(value, (*path, index), spaces, origin)


def _parse_space(node: dict, path: tuple, origin: str) -> Space:
    name = ".".join(str(part) for part in path)
    where = f"{origin}: {name}"
    kind = node["search"]
    if kind not in SPACE_KINDS:
        raise MergewiseError(f"{where}: search: {kind!r} is not a search space ({', '.join(SPACE_KINDS)})")
    allowed = {"search", "default", *(("values",) if kind == "choice" else ("low", "high"))}
    unknown = sorted(set(node) - allowed)
    if unknown:
        raise MergewiseError(
            f"{where}: {unknown[0]}: unknown key for a {kind} space (takes {', '.join(sorted(allowed))})"
        )
    default = node.get("default")
    if default is not None:
        default = _number(default, f"{where}.default")
    if kind == "choice":
        values = node.get("values")
        if not isinstance(values, list) or not values:
            raise MergewiseError(f"{where}.values: a choice space lists its values")
        numbers = tuple(_number(value, f"{where}.values") for value in values)
        if default is not None and default not in numbers:
            raise MergewiseError(f"{where}.default: {default} is not one of the values")
        return Space(name, path, kind, min(numbers), max(numbers), numbers, default)
    for bound in ("low", "high"):
        if bound not in node:
            raise MergewiseError(f"{where}: a {kind} space needs low and high")
    low, high = _number(node["low"], f"{where}.low"), _number(node["high"], f"{where}.high")
    if low > high:
        raise MergewiseError(f"{where}: low ({low}) > high ({high})")
    if kind == "loguniform" and low <= 0:
        raise MergewiseError(f"{where}.low: a loguniform space lies above 0, got {low}")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise MergewiseError(f"{where}: an int space has whole bounds, got {low} and {high}")
    if default is not None and not low <= default <= high:
        raise MergewiseError(f"{where}.default: {default} lies outside [{low}, {high}]")
    return Space(name, path, kind, low, high, (), default)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergewiseError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _template(data: dict, spaces: list[Space]) -> dict:
    """The recipe with a placeholder (None) where each space was."""
    template = copy.deepcopy(data)
    for space in spaces:
        _set(template, space.path, None)
    return template


def _set(recipe: dict, path: tuple, value: Any) -> None:
    node = recipe
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _check_numeric_key(space: Space, method: Any, origin: str) -> None:
    """Spaces belong on numeric method parameters and on numeric settings of `aim:` and `mediator:`."""
    where = f"{origin}: {space.name}"
    parameter = _method_parameter(space.path)
    if parameter is not None:
        if not isinstance(method, str):
            raise MergewiseError(f"{origin}: merge_method: missing (it decides which parameters are numeric)")
        schema = get_method(method).parameters
        if parameter not in schema:
            raise MergewiseError(
                f"{where}: {parameter!r} is not a parameter of {method} (has {', '.join(sorted(schema))})"
            )
        if schema[parameter].kind is bool:
            raise MergewiseError(
                f"{where}: {method}'s {parameter!r} is not numeric (true/false): it cannot be searched"
            )
        return
    field = _block_field(space.path)
    if field is not None and any(member in (int, float) for member in _members(field.annotation)):
        return
    raise MergewiseError(
        f"{where}: not a numeric setting a search may vary (search spaces go on method "
        "parameters and on the numeric settings of aim: and mediator:)"
    )


def _method_parameter(path: tuple) -> str | None:
    """The method parameter a path sets (through a gradient list or a `{filter, value}` entry)."""
    for prefix in PARAMETER_MAPS:
        if len(path) > len(prefix) and all(
            part == expected or (expected is int and isinstance(part, int)) for part, expected in zip(path, prefix)
        ):
            name, rest = path[len(prefix)], path[len(prefix) + 1 :]
            if rest in ((), ("value",)) or (
                len(rest) in (1, 2) and isinstance(rest[0], int) and rest[1:] in ((), ("value",))
            ):
                return name
    return None


def _block_field(path: tuple) -> FieldInfo | None:
    """The schema field of a recipe block (`aim:`, `mediator:`) that `path` sets, if any."""
    if path[0] not in stages.BLOCKS or len(path) < 2 or path[1] in stages.block_spec(path[0]).fixed_keys:
        return None
    schema: type[BaseModel] | None = stages.block_spec(path[0]).schema
    field = None
    for part in path[1:]:
        if schema is None or not isinstance(part, str) or part not in schema.model_fields:
            return None
        field = schema.model_fields[part]
        schema = next(
            (
                member
                for member in _members(field.annotation)
                if isinstance(member, type) and issubclass(member, BaseModel)
            ),
            None,
        )
    return field


def _members(annotation: Any) -> list:
    """The types a field accepts (Optional, Union and Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return [member for argument in typing.get_args(annotation) for member in _members(argument)]
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    return [annotation]


def _with_default(space: Space, method: str | None) -> Space:
    """Fill in the baseline value: the key's own default, else the centre of the space."""
    if space.default is not None:
        return space
    default = _key_default(space, method)
    if default is None or not _inside(space, default):
        default = _centre(space)
    return Space(space.name, space.path, space.kind, space.low, space.high, space.values, default)


def _key_default(space: Space, method: str | None) -> float | None:
    """The default of the method parameter or block setting the space sets (`_check_numeric_key`
    made sure it is one, and that a method parameter's recipe names its method)."""
    parameter = _method_parameter(space.path)
    if parameter is not None:
        assert method is not None
        value = get_method(method).parameters[parameter].default
    else:
        field = _block_field(space.path)
        assert field is not None
        value = field.default
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _inside(space: Space, value: float) -> bool:
    return value in space.values if space.kind == "choice" else space.low <= value <= space.high


def _centre(space: Space) -> float:
    if space.kind == "choice":
        return space.values[(len(space.values) - 1) // 2]
    if space.kind == "loguniform":
        return math.sqrt(space.low * space.high)
    centre = (space.low + space.high) / 2
    return float(round(centre)) if space.kind == "int" else centre
