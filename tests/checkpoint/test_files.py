"""The one reader of JSON, YAML and JSON Lines files: what Python's parsers take but a file must not
hold (deep nesting, alias bombs, integers of thousands of digits, NaN, bytes that are not UTF-8)
is one error naming the file, fast and in little memory; a file is read only inside its folder."""

from __future__ import annotations

import time

import pytest
from pydantic import BaseModel

from mergewise.checkpoint.files import (
    check_folder_links,
    inside_folder,
    iter_jsonl,
    read_json,
    read_jsonl,
    read_lines,
    read_yaml,
)
from mergewise.errors import MergewiseError
from tests.support.crafted import billion_laughs


@pytest.mark.parametrize(
    "text, named",
    [
        ("[" * 20_000 + "]" * 20_000, "nested more than 64 levels"),  # Python's parser: RecursionError
        ("[" * 100 + "]" * 100, "nested more than 64 levels"),  # parses, but deeper than any real file
        ('{"r": ' + "7" * 5000 + "}", "an integer of 5000 digits"),  # Python 3.11: ValueError past 4300 digits
        ('{"r": Infinity}', "Infinity is not a finite number"),
        ('{"r": NaN}', "NaN is not a finite number"),
        ('{"r": 1e999}', "1e999 is not a finite number"),  # a float literal that overflows to inf
        ('{"r": 1,}', "not valid JSON"),
    ],
)
def test_json_a_file_must_not_hold_is_one_error_naming_it(text, named, tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(text)
    with pytest.raises(MergewiseError, match=f"adapter_config.json: adapter config: {named}"):
        read_json(path, "adapter config")


def test_json_keeps_large_but_sane_numbers_and_non_finite_ones_where_allowed(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text('{"model_max_length": 1000000000000000019884624838656, "x": NaN}')  # transformers' "no limit"
    data = read_json(path, "tokenizer config", finite=False)
    assert data["model_max_length"] == 1000000000000000019884624838656 and data["x"] != data["x"]


def test_bytes_that_are_not_utf8_and_oversized_files_are_refused(tmp_path):
    binary = tmp_path / "config.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(MergewiseError, match="config.json: config.json is not UTF-8 text"):
        read_json(binary, "config.json")
    big = tmp_path / "index.json"
    big.write_text("[" + "0," * 600 + "0]")
    with pytest.raises(MergewiseError, match="larger than 1000 bytes"):
        read_json(big, "weight index", max_bytes=1000)


class Adapter(BaseModel):
    r: int


def test_a_schema_error_names_the_file_and_key(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"r": [1]}')
    with pytest.raises(MergewiseError, match=r"adapter_config.json: r: Input should be a valid integer"):
        read_json(path, "adapter config", schema=Adapter)
    path.write_text('{"r": 8}')
    assert read_json(path, "adapter config", schema=Adapter) == Adapter(r=8)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "search.yml"
    path.write_text(billion_laughs(9))
    assert len(path.read_bytes()) < 700
    started = time.perf_counter()
    with pytest.raises(MergewiseError, match="search.yml: invalid YAML .*more than 1000000 values once its aliases"):
        read_yaml(path, "recipe")
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    "text, named",
    [
        ("a: " + "[" * 20_000 + "]" * 20_000, "nested more than 64 levels deep"),
        ("a: &loop [1, *loop]", "alias \\*loop lies inside its own anchor"),
        ("r: " + "7" * 5000, "Exceeds the limit"),  # an integer Python will not make
        ("a: [", "while parsing a flow node at line 1"),
    ],
)
def test_yaml_a_file_must_not_hold_is_one_error_naming_it(text, named, tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    with pytest.raises(MergewiseError, match=f"recipe.yml: invalid YAML .*{named}"):
        read_yaml(path, "recipe")


def test_yaml_aliases_within_the_limit_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text(billion_laughs(3) + "shared: &p {weight: 0.5}\nm: {<<: *p, density: 1}\n")
    data = read_yaml(path, "recipe")
    assert len(data["a2"]) == 10 and data["m"] == {"weight": 0.5, "density": 1}


def test_jsonl_is_streamed_a_line_at_a_time_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n\n' + '{"prompt": "' + "x" * 5000 + '"}\n' + '{"prompt": "three"}\r\n')
    records = list(iter_jsonl(path, "prompts file", ("prompt",), max_line_bytes=1000))
    assert records == [{"prompt": "one"}, None, {"prompt": "three"}]  # the long line is left unread
    assert [number for number, _ in read_lines(path, "prompts file", max_line_bytes=1000)] == [1, 2, 3, 4]
    for line, named in [
        ("[" * 5000 + "]" * 5000, "prompts.jsonl:2: nested more than 64 levels"),
        ('{"prompt": "a", "n": ' + "9" * 5000 + "}", "prompts.jsonl:2: an integer of 5000 digits"),
        ('["prompt"]', "prompts.jsonl:2: expected an object with string 'prompt'"),
    ]:
        path.write_text('{"prompt": "one"}\n' + line + "\n")
        with pytest.raises(MergewiseError, match=named):
            read_jsonl(path, "prompts file", ("prompt",))
    path.write_text('{"prompt": "one"}\n{"prompt": "' + "x" * 5000 + '"}\n')
    with pytest.raises(MergewiseError, match="prompts.jsonl: prompts file has a line longer than 1000 bytes"):
        read_jsonl(path, "prompts file", ("prompt",), max_line_bytes=1000)  # was a None among the records
    path.write_bytes(b'{"prompt": "one"}\n\xff\xfe\n')
    with pytest.raises(MergewiseError, match="prompts.jsonl:2: prompts file is not UTF-8 text"):
        read_jsonl(path, "prompts file", ("prompt",))


def test_files_are_read_only_inside_their_folder(tmp_path):
    secret = tmp_path / "token"
    secret.write_text('{"token": "hf_secret"}')
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "mergewise.yml").symlink_to(secret)
    with pytest.raises(MergewiseError, match="mergewise.yml: record resolves to .*token, outside the model folder"):
        read_yaml(folder / "mergewise.yml", "record", folder=folder)
    with pytest.raises(MergewiseError, match="adapter_config.json: adapter config is missing"):
        inside_folder(folder / "adapter_config.json", folder, "adapter config")
    (folder / "tokenizer.json").symlink_to(secret)
    with pytest.raises(MergewiseError, match="tokenizer.json: file resolves to"):
        check_folder_links(folder)
