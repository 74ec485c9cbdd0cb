"""JSON Lines files (prompts, documents, examples): one reader, one way of reporting a bad line."""

from __future__ import annotations

import json
from pathlib import Path

from mergewise.errors import MergewiseError


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """The objects of a JSONL file, blank lines skipped; each must hold every one of `fields` as a
    string (`"prompt|text"`: either one). A bad line is one error naming the file, the line and what
    was expected."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MergewiseError(f"{path}: not UTF-8 text") from None
    alternatives = [field.split("|") for field in fields]
    expected = " and ".join(" or ".join(f"'{name}'" for name in names) for names in alternatives)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MergewiseError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not all(any(isinstance(record.get(name), str) for name in names)
                                                   for names in alternatives):
            raise MergewiseError(f"{path}:{number}: expected an object with string {expected}")
        records.append(record)
    return records
