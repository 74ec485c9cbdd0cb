"""One reader for every JSON, YAML and JSON Lines file mergewise reads: a downloaded folder's
config.json, weight index, adapter_config.json, tokenizer_config.json or mergewise.yml, a Mediator
folder's mediator.json, a staged merge's journal, a recipe, a prompts or data file.

Python's parsers take what such a file must not hold: nesting that overflows the stack, YAML aliases
that expand a few hundred bytes into billions of values, integers of thousands of digits, NaN and
infinity. Here each file is read within a size, a nesting depth and (YAML) an expanded size, its
numbers bounded, then checked against a pydantic schema of the fields mergewise uses, so that a
crafted or broken file is one MergewiseError naming it and the key at fault (the way safetensors
headers are read, `reader.read_safetensors_header`). A file inside a model folder is read only if it
resolves inside that folder (`inside_folder`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError
from yaml.composer import ComposerError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

from mergewise.errors import MergewiseError

MAX_FILE_BYTES = 64 << 20  # a weight index of 100 000 tensors is ~10 MB; a config or manifest far less
MAX_DEPTH = 64  # the deepest file mergewise reads nests under 10 levels
MAX_DIGITS = 64  # an integer literal of more is no count or id (1e30, a tokenizer's "no limit", has 31)
MAX_YAML_VALUES = 1_000_000  # values a YAML file may stand for once its aliases are expanded
MAX_LINE_BYTES = 16 << 20  # one JSON Lines record (a prompt, a document)

Schema = TypeVar("Schema")


def inside_folder(file: Path, folder: Path, what: str) -> Path:
    """`file` if it is a regular file inside `folder` (resolved), or inside the Hugging Face cache
    repository the folder is a snapshot of (the cache keeps a snapshot's files as symlinks into the
    repository's blobs). A downloaded folder is untrusted input: an index entry or a symlink must not
    make mergewise read, or copy into its output, a file from elsewhere."""
    resolved = _resolved_inside(file, folder, what)
    if not resolved.is_file():
        raise MergewiseError(f"{file}: {what} is {'not a regular file' if resolved.exists() else 'missing'}")
    return file


def check_folder_links(folder: Path) -> None:
    """Every entry of `folder` (and of its `additional_chat_templates/`) resolves inside it, as
    `inside_folder` says: transformers reads whichever of a folder's files it looks for by name, so
    none of them may be a symlink out of it."""
    for entry in [*folder.iterdir(), *(folder / "additional_chat_templates").glob("*")]:
        if entry.is_symlink():
            _resolved_inside(entry, folder, "file")


def _resolved_inside(file: Path, folder: Path, what: str) -> Path:
    folder = folder.resolve()
    resolved = file.resolve()
    allowed = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        allowed.append(folder.parent.parent)
    if not any(resolved.is_relative_to(root) for root in allowed):
        raise MergewiseError(f"{file}: {what} resolves to {resolved}, outside the model folder {folder}")
    return resolved


def read_bytes(path: Path, what: str, *, folder: Path | None = None, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (inside `folder`, when given)."""
    if folder is not None:
        inside_folder(path, folder, what)
    elif not path.is_file():
        raise MergewiseError(f"{path}: {what} not found (or not a regular file)")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise MergewiseError(f"{path}: {what} is larger than {max_bytes} bytes; refused")
    return data


def read_text(path: Path, what: str, *, folder: Path | None = None, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A UTF-8 text file, read as `read_bytes` reads it."""
    return _decoded(read_bytes(path, what, folder=folder, max_bytes=max_bytes), path, what)


def read_json(
    path: Path,
    what: str,
    *,
    folder: Path | None = None,
    schema: type[Schema] | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    max_depth: int = MAX_DEPTH,
    finite: bool = True,
) -> Any:
    """A JSON file (see the module's docstring), validated against `schema` when one is given (then
    the validated model is returned). `finite` False lets NaN and infinity through, for files whose
    numbers mergewise does not read but a schema's fields."""
    data = parse_json(
        read_text(path, what, folder=folder, max_bytes=max_bytes), f"{path}: {what}", max_depth=max_depth, finite=finite
    )
    return data if schema is None else validated(schema, data, str(path))


def parse_json(text: str, where: str, *, max_depth: int = MAX_DEPTH, finite: bool = True) -> Any:
    """JSON text with at most `max_depth` levels of nesting and MAX_DIGITS-digit integers; NaN and
    infinity (the literals, or a float too large for a double) only when not `finite`."""

    def number(literal: str) -> float:
        value = float(literal)
        if finite and not math.isfinite(value):
            raise _Refused(f"{literal[:20]} is not a finite number")
        return value

    def integer(literal: str) -> int:
        if len(literal.lstrip("-")) > MAX_DIGITS:
            raise _Refused(f"an integer of {len(literal)} digits")
        return int(literal)

    try:
        data = json.loads(text, parse_float=number, parse_int=integer, parse_constant=number if finite else float)
    except _Refused as error:
        raise MergewiseError(f"{where}: {error}") from None
    except RecursionError:
        raise MergewiseError(f"{where}: nested more than {max_depth} levels deep") from None
    except ValueError as error:
        raise MergewiseError(f"{where}: not valid JSON ({str(error)[:200]})") from None
    if _depth(data) > max_depth:
        raise MergewiseError(f"{where}: nested more than {max_depth} levels deep")
    return data


def read_yaml(
    path: Path,
    what: str,
    *,
    folder: Path | None = None,
    schema: type[Schema] | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    max_depth: int = MAX_DEPTH,
    max_values: int = MAX_YAML_VALUES,
) -> Any:
    """A YAML file of one document, nested at most `max_depth` deep and standing for at most
    `max_values` values with its aliases expanded; validated against `schema` when one is given."""
    text = read_text(path, what, folder=folder, max_bytes=max_bytes)
    loader = _BoundedLoader(text, max_depth, max_values)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        raise MergewiseError(f"{path}: invalid YAML ({_yaml_problem(error)})") from None
    except RecursionError:
        raise MergewiseError(f"{path}: invalid YAML (nested more than {max_depth} levels deep)") from None
    except ValueError as error:  # a scalar Python cannot make (an integer of 5000 digits, month 13)
        raise MergewiseError(f"{path}: invalid YAML ({str(error)[:200]})") from None
    finally:
        loader.dispose()
    return data if schema is None else validated(schema, data, str(path))


def read_lines(path: Path, what: str, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each line of a UTF-8 file, read a block at a time (however large the
    file, one line is held); a line longer than `max_line_bytes` comes as None, unread."""
    if not path.is_file():
        raise MergewiseError(f"{path}: {what} not found (or not a regular file)")
    with open(path, "rb") as handle:
        number = 0
        while True:
            line = handle.readline(max_line_bytes + 1)
            if not line:
                return
            number += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
                continue
            yield number, _decoded(line, path, what, number).removesuffix("\n").removesuffix("\r")


def read_jsonl(
    path: Path,
    what: str,
    fields: tuple[str, ...],
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[dict]:
    """The objects of a JSON Lines file of at most `max_bytes`, blank lines skipped; each must hold
    every one of `fields` as a string (`"prompt|text"`: either one). A bad line is one error naming
    the file, the line and what was expected; so is a line over `max_line_bytes`."""
    if path.is_file() and path.stat().st_size > max_bytes:
        raise MergewiseError(f"{path}: {what} is larger than {max_bytes} bytes; refused")
    records = []
    for record in iter_jsonl(path, what, fields, max_line_bytes=max_line_bytes):
        if record is None:
            raise MergewiseError(f"{path}: {what} has a line longer than {max_line_bytes} bytes; refused")
        records.append(record)
    return records


def iter_jsonl(
    path: Path, what: str, fields: tuple[str, ...], *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[dict | None]:
    """`read_jsonl`'s records one at a time; a line over `max_line_bytes` comes as None, unread."""
    alternatives = [field.split("|") for field in fields]
    expected = " and ".join(" or ".join(f"'{name}'" for name in names) for names in alternatives)
    for number, line in read_lines(path, what, max_line_bytes=max_line_bytes):
        if line is None:
            yield None
            continue
        if not line.strip():
            continue
        record = parse_json(line, f"{path}:{number}")
        if not isinstance(record, dict) or not all(
            any(isinstance(record.get(name), str) for name in names) for names in alternatives
        ):
            raise MergewiseError(f"{path}:{number}: expected an object with string {expected}")
        yield record


def validated(schema: type[Schema], data: Any, origin: str, key: str = "") -> Schema:
    """`data` checked against `schema`; the first problem is one error naming `origin` and the key path."""
    try:
        return _adapter(schema).validate_python(data)  # type: ignore[arg-type]  # mypy: type[T] is not Hashable
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in (key, *first["loc"]) if part != "") or "(top level)"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise MergewiseError(f"{origin}: {location}: {message}") from None


@functools.cache
def _adapter(schema: Any) -> TypeAdapter:
    return TypeAdapter(schema)


class _Refused(ValueError):
    """A number a file must not hold, raised from inside the JSON parser."""


def _decoded(data: bytes, path: Path, what: str, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        where = f"{path}:{line}" if line is not None else str(path)
        raise MergewiseError(f"{where}: {what} is not UTF-8 text") from None


def _depth(data: Any) -> int:
    """Levels of nesting of parsed JSON, counted without recursion."""
    deepest, pending = 0, [(data, 1)]
    while pending:
        value, level = pending.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            pending.extend((item, level + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document nested deeper than `max_depth` (its composer
    recurses per level) or standing for more than `max_values` values once aliases are expanded
    (counted as each node is composed, so an alias bomb stops at the level that crosses the limit)."""

    def __init__(self, text: str, max_depth: int, max_values: int):
        super().__init__(text)
        self.max_depth = max_depth
        self.max_values = max_values
        self._level = 0
        self._values: dict[int, int] = {}  # composed node → values it stands for

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            anchored = self.anchors.get(event.anchor)
            if anchored is not None and id(anchored) not in self._values:
                raise ComposerError(None, None, f"alias *{event.anchor} lies inside its own anchor", event.start_mark)
            return super().compose_node(parent, index)
        self._level += 1
        try:
            if self._level > self.max_depth:
                raise ComposerError(
                    None, None, f"nested more than {self.max_depth} levels deep", self.peek_event().start_mark
                )
            node = super().compose_node(parent, index)
        finally:
            self._level -= 1
        children = (
            [item for pair in node.value for item in pair]
            if isinstance(node, MappingNode)
            else node.value
            if isinstance(node, SequenceNode)
            else []
        )
        values = 1 + sum(self._values[id(child)] for child in children)
        if values > self.max_values:
            raise ComposerError(
                None,
                None,
                f"stands for more than {self.max_values} values once its aliases are expanded",
                node.start_mark,
            )
        self._values[id(node)] = values
        return node


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The first line of a YAML error and where it is."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{str(error).splitlines()[0] if str(error) else type(error).__name__}{where}"
