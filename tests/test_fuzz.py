"""Property-based fuzzing of what mergewise reads from strangers, through the real command entry point:
recipe YAML, safetensors headers, and the files a downloaded folder holds (config.json, the weight
index, tokenizer_config.json, a chat template, adapter_config.json and the LoRA factors, a Mediator
folder's mediator.json) and a staged merge's journal. Whatever the input, the outcome is exit 0, or
exit 2 with one `error:` line — never a traceback, a hang or a file left behind.

MERGEWISE_FUZZ_EXAMPLES sets the examples of each test (a few dozen by default, so the suite stays
fast); MERGEWISE_FUZZ_EXAMPLES=1500 hunts longer."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergewise.cli import main
from tests.support.tiny_models import build_lora_adapter, build_tiny_model

pytestmark = pytest.mark.integration  # generated inputs through the command, each in a process of its own

FUZZ = settings(
    max_examples=int(os.environ.get("MERGEWISE_FUZZ_EXAMPLES", "40")),
    deadline=10_000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs",
    "della",
    "slerp",
    "nuslerp",
    "model_stock",
    "passthrough",
    "no_such_method",
]
PARAMETERS = ["weight", "density", "gamma", "epsilon", "t", "lambda", "normalize", "rescale", "filter_wise", "densty"]

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)
)
values = st.recursive(
    junk,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["filter", "value", "x"]), inner, max_size=2)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-models")
    return {
        name: build_tiny_model("llama", root / name, seed=seed, num_layers=2)
        for seed, name in enumerate(("base", "a", "b"))
    }


def run_cli(*argv: str) -> int:
    """The command, failing the test rather than hanging it past a minute."""

    def hung(signum, frame):
        raise TimeoutError(f"mergewise {' '.join(argv)} ran past its time limit")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        return main(list(argv))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(capsys, status: int, out_dir: Path, kept: tuple[Path, ...] = ()) -> None:
    """Exit 0, or exit 2 with one `error:` line (after transformers' loading progress, if any) and no
    output; no staging folder or lock left but the `kept` ones (a killed merge's, kept for --resume)."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert status in (0, 2), captured.err
    if status == 2:
        lines = [line for line in captured.err.strip().splitlines() if not line.startswith("Loading weights")]
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert not out_dir.exists()
    assert sorted(set(out_dir.parent.glob(f".{out_dir.name}.*")) - set(kept)) == []


def recipes(models: dict[str, Path]):
    model = st.sampled_from([*(str(path) for path in models.values()), "./missing", 7])
    entry = st.fixed_dictionaries(
        {"model": model},
        optional={
            "parameters": st.dictionaries(st.sampled_from(PARAMETERS), values, max_size=3),
            "layer_range": values,
        },
    )
    return st.fixed_dictionaries(
        {"merge_method": st.one_of(st.sampled_from(METHODS), junk)},
        optional={
            "models": st.one_of(st.lists(entry, max_size=3), junk),
            "base_model": st.one_of(model, junk),
            "parameters": st.one_of(st.dictionaries(st.sampled_from(PARAMETERS), values, max_size=3), junk),
            "dtype": st.sampled_from(["bfloat16", "float32", "int8", "fp17", None]),
            "slices": st.one_of(
                st.lists(st.fixed_dictionaries({"sources": st.lists(entry, max_size=2)}), max_size=2), junk
            ),
            "aim": values,
            "surprise": values,
        },
    )


def test_fuzzed_recipes_end_in_a_merge_or_one_error_line(models, tmp_path_factory, capsys):
    @FUZZ
    @given(recipe=recipes(models))
    def check(recipe):
        folder = tmp_path_factory.mktemp("recipe")
        config = folder / "recipe.yml"
        config.write_text(yaml.safe_dump(recipe, allow_unicode=True))
        out_dir = folder / "out"
        outcome(capsys, run_cli("merge", str(config), str(out_dir), "--quiet"), out_dir)

    check()


def test_fuzzed_yaml_text_ends_in_one_error_line(tmp_path_factory, capsys):
    @FUZZ
    @given(text=st.text(alphabet=st.sampled_from(list("{}[]:-,'\"&*!|>%@ \n\tabmodel_012")), max_size=200))
    def check(text):
        folder = tmp_path_factory.mktemp("yaml")
        (folder / "recipe.yml").write_text(text)
        outcome(capsys, run_cli("merge", str(folder / "recipe.yml"), str(folder / "out"), "--quiet"), folder / "out")

    check()


dtypes = st.sampled_from(["BF16", "F32", "F16", "I64", "U8", "F8", 3, None])
counts = st.one_of(st.integers(-3, 12), st.floats(-1, 8), st.booleans(), st.text(max_size=2))


@st.composite
def headers(draw) -> tuple[dict, int]:
    """A header of a few entries, mostly well-formed: sizes follow the shapes unless drawn otherwise."""
    entries, position = {}, 0
    for index in range(draw(st.integers(0, 3))):
        shape = draw(st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(counts, max_size=3), junk))
        dtype = draw(dtypes)
        width = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8, "U8": 1}.get(dtype, 1)
        size = width * math.prod(shape) if isinstance(shape, list) and all(type(s) is int for s in shape) else 4
        offsets = draw(st.one_of(st.just([position, position + size]), st.lists(counts, max_size=3)))
        position += size
        name = draw(st.sampled_from([f"model.layers.{index}.weight", "model.layers.0.weight", "__metadata__", ""]))
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    extra = draw(st.integers(-4, 4))
    return entries, max(0, position + extra)


def test_fuzzed_safetensors_headers_end_in_a_merge_or_one_error_line(tmp_path_factory, capsys):
    @FUZZ
    @given(header=headers(), nesting=st.integers(0, 3000))
    def check(header, nesting):
        entries, data_size = header
        folder = tmp_path_factory.mktemp("weights")
        model = folder / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama"}))  # depth: the layers the weights hold
        encoded = json.dumps(entries).encode() if nesting < 2500 else ("[" * nesting + "]" * nesting).encode()
        (model / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_size))
        recipe = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}
        (folder / "recipe.yml").write_text(yaml.safe_dump(recipe))
        outcome(capsys, run_cli("merge", str(folder / "recipe.yml"), str(folder / "out"), "--quiet"), folder / "out")

    check()


# ------------------------------------------------------------------------ the files a folder holds
numbers = st.one_of(
    st.integers(-3, 10), st.integers(-(2**70), 2**70), st.sampled_from([0.5, -1.0, 1e999, float("nan")])
)
json_values = st.recursive(
    st.one_of(junk, numbers),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def mutated(draw, document: dict, paths: list[str]) -> bytes:
    """`document` (a real file's JSON) with a few of its dotted `paths` set to drawn values or
    removed; or instead bytes, nesting far past any limit, or an integer of thousands of digits."""
    kind = draw(st.sampled_from(["edit"] * 6 + ["bytes", "nesting", "digits"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "nesting":
        depth = draw(st.integers(50, 3000))
        return ("[" * depth + "]" * depth).encode()
    edited = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        *parents, key = draw(st.sampled_from(paths)).split(".")
        node = edited
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            if draw(st.booleans()):
                node.pop(key, None)
            else:
                node[key] = draw(json_values) if kind == "edit" else "DIGITS"
    return json.dumps(edited).replace('"DIGITS"', "7" * draw(st.integers(30, 6000))).encode()


def json_of(path: Path) -> dict:
    return json.loads(path.read_text())


def linked_copy(model: Path, folder: Path) -> Path:
    """A copy of `model` whose weights are hard links (never written) and other files copies."""
    folder.mkdir()
    for path in model.iterdir():
        (os.link if path.suffix == ".safetensors" else shutil.copyfile)(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return build_tiny_model(
        "llama", tmp_path_factory.mktemp("fuzz-sharded") / "model", seed=3, num_layers=2, shard_size="100KB"
    )


FOLDER_FILES = {  # file → the dotted keys its mutations touch
    "config.json": [
        "model_type",
        "num_hidden_layers",
        "n_layer",
        "layer_types",
        "text_config",
        "text_config.num_hidden_layers",
        "text_config.layer_types",
        "vocab_size",
        "tie_word_embeddings",
        "hidden_size",
        "max_position_embeddings",
        "torch_dtype",
    ],
    "model.safetensors.index.json": [
        "weight_map",
        "weight_map.model.norm.weight",
        "weight_map.lm_head.weight",
        "metadata",
    ],
    "tokenizer_config.json": [
        "chat_template",
        "model_max_length",
        "added_tokens_decoder",
        "tokenizer_class",
        "bos_token",
    ],
}


def test_fuzzed_model_folder_files_end_in_a_merge_or_one_error_line(models, sharded, tmp_path_factory, capsys):
    @FUZZ
    @given(
        data=st.data(),
        name=st.sampled_from([*FOLDER_FILES, "chat_template.jinja"]),
        form=st.sampled_from(["models", "slices"]),
        stop=st.integers(0, 3),
        chat_template=st.sampled_from([None, "auto", "chatml"]),
        union=st.booleans(),
    )
    def check(data, name, form, stop, chat_template, union):
        folder = tmp_path_factory.mktemp("folder")
        model = linked_copy(sharded if name.startswith("model.") else models["a"], folder / "downloaded")
        if name == "chat_template.jinja":
            content = data.draw(
                st.one_of(st.binary(max_size=40), st.text(alphabet="{}%# ab|'\n", max_size=40).map(str.encode))
            )
        else:
            content = data.draw(mutated(json_of(model / name), FOLDER_FILES[name]))
        (model / name).write_bytes(content)
        recipe = (
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(models["base"]), "parameters": {"weight": 0.5}},
                    {"model": str(model), "parameters": {"weight": 0.5}},
                ],
            }
            if form == "models"
            else {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": str(model), "layer_range": [0, stop]}]}],
            }
        )
        recipe.update(
            {
                key: value
                for key, value in (("chat_template", chat_template), ("tokenizer_source", "union" if union else None))
                if value
            }
        )
        (folder / "recipe.yml").write_text(yaml.safe_dump(recipe))
        out_dir = folder / "out"
        outcome(capsys, run_cli("merge", str(folder / "recipe.yml"), str(out_dir), "--quiet"), out_dir)

    check()


ADAPTER_KEYS = [
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "peft_type",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
]


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-adapter") / "adapter"
    build_lora_adapter(models["base"], folder)
    return folder


def test_fuzzed_adapters_end_in_a_merge_or_one_error_line(models, adapter, tmp_path_factory, capsys):
    @FUZZ
    @given(
        data=st.data(),
        factor=st.one_of(st.none(), st.lists(st.integers(0, 5), max_size=3)),
        value=st.sampled_from([0.1, float("nan"), float("inf"), 1e30]),
    )
    def check(data, factor, value):
        folder = tmp_path_factory.mktemp("adapted")
        copy = Path(shutil.copytree(adapter, folder / "adapter"))
        (copy / "adapter_config.json").write_bytes(
            data.draw(mutated(json_of(adapter / "adapter_config.json"), ADAPTER_KEYS))
        )
        if factor is not None:  # a factor of another shape, or one holding `value`
            tensors = load_file(copy / "adapter_model.safetensors")
            name = data.draw(st.sampled_from(sorted(tensors)))
            tensors[name] = torch.full(factor, value) if factor else tensors[name].fill_(value)
            save_file(tensors, copy / "adapter_model.safetensors")
        recipe = {
            "merge_method": "linear",
            "models": [{"model": f"{models['base']}+{copy}", "parameters": {"weight": 1.0}}],
        }
        (folder / "recipe.yml").write_text(yaml.safe_dump(recipe))
        out_dir = folder / "out"
        outcome(capsys, run_cli("merge", str(folder / "recipe.yml"), str(out_dir), "--quiet"), out_dir)

    check()


MANIFEST_KEYS = [
    "format",
    "tasks",
    "routed_tensors",
    "router",
    "router.tasks",
    "router.temperature",
    "router.settings",
    "router.settings.feature_layers",
    "router.settings.kind",
    "router.settings.max_tokens",
    "settings",
    "merge_method",
]


@pytest.fixture(scope="module")
def mediator_folder(models, tmp_path_factory) -> Path:
    """A small Mediator build of the two fuzzing models as experts."""
    from mergewise.mediator.build import build

    root = tmp_path_factory.mktemp("fuzz-mediator")
    experts = []
    for task, words in (("first", "one two three four five six"), ("second", "quick brown fox lazy dog cat")):
        (root / f"{task}.txt").write_text(
            "\n".join(" ".join(words.split()[index % 6 :] + words.split()[: index % 4]) for index in range(16)) + "\n"
        )
        experts.append(
            {"model": str(models["a" if task == "first" else "b"]), "task": task, "prompts": str(root / f"{task}.txt")}
        )
    recipe = {
        "merge_method": "linear",
        "base_model": str(models["base"]),
        "dtype": "float32",
        "mediator": {"experts": experts, "memory_budget": 2.0, "router": {"holdout": 0.25}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a router of nonsense prompts may not tell the tasks apart
        return build(recipe, root / "mediator", quiet=True, seed=0).out_dir


def test_fuzzed_mediator_manifests_end_in_a_route_or_one_error_line(mediator_folder, tmp_path_factory, capsys):
    manifest = json_of(mediator_folder / "mediator" / "mediator.json")
    paths = MANIFEST_KEYS + [f"routed_tensors.{name}" for name in list(manifest["routed_tensors"])[:2]]

    @FUZZ
    @given(content=mutated(manifest, paths), export=st.booleans())
    def check(content, export):
        folder = tmp_path_factory.mktemp("manifest")
        copy = Path(shutil.copytree(mediator_folder, folder / "downloaded"))
        (copy / "mediator" / "mediator.json").write_bytes(content)
        out_dir = folder / "out"
        command = (
            ["mediator", "export", str(copy), str(out_dir), "--task", "first", "--quiet"]
            if export
            else ["generate", str(copy), "--prompt", "one two", "--max-new-tokens", "2"]
        )
        outcome(capsys, run_cli(*command), out_dir)

    check()


def test_fuzzed_progress_records_end_in_a_merge_or_one_error_line(models, tmp_path_factory, capsys):
    """What `--resume` reads of a killed merge's staging folder; the journal carries the real plan's
    fingerprint, so its other values reach past the fingerprint check."""
    from mergewise.checkpoint.writer import parse_size
    from mergewise.engine import _fingerprint, plan_recipe

    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models[name]), "parameters": {"weight": 0.5}} for name in ("a", "b")],
    }
    fingerprint = _fingerprint(*reversed(plan_recipe(recipe)), parse_size("5GB"))
    journal = {"fingerprint": fingerprint, "seed": 7, "finished": {"model.safetensors": "0" * 64}}

    @FUZZ
    @given(content=mutated(journal, ["fingerprint", "seed", "finished", "finished.model.safetensors"]))
    def check(content):
        folder = tmp_path_factory.mktemp("resume")
        (folder / "recipe.yml").write_text(yaml.safe_dump(recipe))
        staged = folder / ".out.partial-999999999-killed"  # a process that is gone
        staged.mkdir()
        (staged / ".mergewise-progress.json").write_bytes(content)
        out_dir = folder / "out"
        status = run_cli("merge", str(folder / "recipe.yml"), str(out_dir), "--quiet", "--resume")
        outcome(capsys, status, out_dir, kept=(staged,))

    check()
