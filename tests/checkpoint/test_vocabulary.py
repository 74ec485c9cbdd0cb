"""Vocabularies (`tokenizer_source`, the `tokenizer:` block) against mergekit 0.1.5, and the bad
token settings each refused as one error naming its key.

The inputs are a tiny Llama family and fine-tunes of it with tokens added to their tokenizers (and
rows to their embedding and head), as a fine-tune adds a PAD or chat-marker token. Every output
tensor must be identical to mergekit's: the embedding and head compared row by token, since mergekit
gives the tokens that only non-base models add their ids in an order that changes from run to run
(it walks a set of models; mergewise takes the recipe's order), and every padding row by position.
The output tokenizers must hold the same tokens (ids too, where mergekit's are fixed), the same added
tokens with the same settings and the same special tokens.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import mergewise
from mergewise.config import MergeConfig
from mergewise.plan import build_plan
from tests.methods.test_peer_mergekit import MERGEKIT_YAML, SEED, _run_mergekit
from tests.support.processes import run_measured
from tests.support.tiny_models import read_state_dict, with_added_tokens
from tests.test_errors import assert_refused, merge, write_recipe

pytestmark = pytest.mark.integration  # mergekit 0.1.5 run on the same files

VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# Cases where two non-base models each add tokens the base lacks: mergekit's ids for them vary.
ORDER_VARIES = {"union-two-experts"}


class Models:
    """The base, a fine-tune with one added PAD token, two fine-tunes that add a shared token and
    one of their own each (the second also a plain, non-special word), and a base whose tokenizer is
    one token longer than its embedding."""

    def __init__(self, family, root: Path):
        self.base = family.base
        self.pad = with_added_tokens(family.fine_tunes[0], root / "pad", ["<|pad|>"], seed=11)
        self.first = with_added_tokens(family.fine_tunes[1], root / "first", ["<|shared|>", "<|first|>"], seed=12)
        second = with_added_tokens(family.fine_tunes[2], root / "second-special", ["<|shared|>", "<|second|>"], seed=13)
        self.second = with_added_tokens(second, root / "second", ["mergewise"], seed=14, special=False)
        self.long_tokenizer = with_added_tokens(family.base, root / "long-tokenizer", ["<|unused|>"], seed=15)
        config = json.loads((self.long_tokenizer / "config.json").read_text())
        (self.long_tokenizer / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
        (self.long_tokenizer / "model.safetensors").write_bytes((self.base / "model.safetensors").read_bytes())


@pytest.fixture(scope="module")
def models(tiny_family, tmp_path_factory) -> Models:
    return Models(tiny_family("llama"), tmp_path_factory.mktemp("vocabularies"))


def _task_arithmetic(models: Models, expert: Path, **tokenizer) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(models.base),
        "dtype": "bfloat16",
        "models": [{"model": str(models.base)}, {"model": str(expert), "parameters": {"weight": 0.7}}],
        **tokenizer,
    }


PEER_RECIPES = {
    "union-pad": lambda m: _task_arithmetic(m, m.pad, tokenizer_source="union"),
    "base-pad": lambda m: _task_arithmetic(m, m.pad, tokenizer_source="base"),
    "model-pad": lambda m: _task_arithmetic(m, m.pad, tokenizer_source=str(m.pad)),
    "union-two-experts": lambda m: {
        "merge_method": "ties",
        "base_model": str(m.base),
        "dtype": "bfloat16",
        "tokenizer_source": "union",
        "models": [{"model": str(m.base)}]
        + [{"model": str(path), "parameters": {"weight": 0.5, "density": 0.5}} for path in (m.first, m.second)],
    },
    "union-long-base-tokenizer": lambda m: {
        **_task_arithmetic(m, m.pad, tokenizer_source="union"),
        "base_model": str(m.long_tokenizer),
        "models": [{"model": str(m.long_tokenizer)}, {"model": str(m.pad), "parameters": {"weight": 0.7}}],
    },
    "block-forced-padded": lambda m: _task_arithmetic(
        m,
        m.pad,
        tokenizer={
            "source": "union",
            "pad_to_multiple_of": 64,
            "tokens": {
                "<s>": {"source": {"kind": "zero"}, "force": True},
                "<pad>": {"source": str(m.pad), "force": True},
                "<|pad|>": {"source": {"kind": "model_token", "model": str(m.base), "token": "</s>"}},
                "</s>": {"source": {"kind": "model_token", "model": str(m.pad), "token_id": 5}, "force": True},
                "brand-new": {"source": {"kind": "zero"}},
            },
        },
    ),
    # (mergekit 0.1.5 fails on a `tokens:` entry new to a `source: base` vocabulary: it adds the
    # token to the base's own tokenizer, then finds it past the base's rows.)
    "block-base-float32": lambda m: _task_arithmetic(
        m,
        m.pad,
        dtype="float32",
        tokenizer={
            "source": "base",
            "pad_to_multiple_of": 96,
            "tokens": {"<pad>": {"source": str(m.pad), "force": True}},
        },
    ),
    # Embedding from the first slice's inputs, head from the last's (where no input has <|pad|>: zeros).
    "union-frankenmerge": lambda m: {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "tokenizer_source": "union",
        "slices": [
            {"sources": [{"model": str(m.pad), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(m.base), "layer_range": [0, 2]}]},
        ],
    },
}


@pytest.fixture(scope="module")
def peer_outputs(models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(recipe, mergekit's output) per case."""
    if not MERGEKIT_YAML:
        pytest.skip("mergekit-yaml not found on PATH nor in $MERGEKIT_YAML (pip install '.[peer]')")
    root = tmp_path_factory.mktemp("peer-vocabularies")
    recipes = {name: make(models) for name, make in PEER_RECIPES.items()}
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    outputs = _run_mergekit(recipes, root)
    return {name: (root / f"{name}.yaml", outputs[name]) for name in recipes}


def _tokenizer_summary(folder: Path) -> tuple[dict, dict, dict, int]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    added = {
        token.content: (token.special, token.normalized, token.lstrip, token.rstrip, token.single_word)
        for token in tokenizer.added_tokens_decoder.values()
    }
    special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return tokenizer.get_vocab(), added, special, json.loads((folder / "config.json").read_text())["vocab_size"]


def vocabulary_mismatches(ours: Path, theirs: Path, *, fixed_ids: bool) -> list[str]:
    """Differences between two merged folders: tokenizers, then tensors (vocabulary rows by token)."""
    (our_vocab, *our_rest), (their_vocab, *their_rest) = _tokenizer_summary(ours), _tokenizer_summary(theirs)
    problems = [
        f"{what}: {a} != mergekit {b}"
        for what, a, b in zip(("added tokens", "special tokens", "config vocab_size"), our_rest, their_rest)
        if a != b
    ]
    if set(our_vocab) != set(their_vocab):
        problems.append(
            f"tokens only in mergewise: {set(our_vocab) - set(their_vocab)}, "
            f"only in mergekit: {set(their_vocab) - set(our_vocab)}"
        )
        return problems
    if fixed_ids and our_vocab != their_vocab:
        problems.append("token ids differ")
    tokens = sorted(their_vocab, key=their_vocab.get)
    our_ids = torch.tensor([our_vocab[token] for token in tokens])
    their_ids = torch.tensor([their_vocab[token] for token in tokens])
    ours_state, theirs_state = read_state_dict(ours), read_state_dict(theirs)
    for name in sorted(ours_state.keys() | theirs_state.keys()):
        if name not in ours_state or name not in theirs_state:
            problems.append(f"{name}: only in {'mergewise' if name in ours_state else 'mergekit'}")
            continue
        a, b = ours_state[name], theirs_state[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: {a.dtype}{list(a.shape)} != mergekit {b.dtype}{list(b.shape)}")
        elif name in VOCABULARY_TENSORS:
            if not torch.equal(a[our_ids], b[their_ids]):
                problems.append(f"{name}: {int((a[our_ids] != b[their_ids]).any(1).sum())} token rows differ")
            if not torch.equal(a[len(tokens) :], b[len(tokens) :]):
                problems.append(f"{name}: padding rows differ")
        elif not torch.equal(a, b):
            problems.append(f"{name}: {int((a != b).sum())} of {a.numel()} entries differ")
    return problems


@pytest.mark.peer
@pytest.mark.parametrize("case", PEER_RECIPES)
def test_vocabulary_matches_mergekit(case, peer_outputs, tmp_path):
    recipe, mergekit_out = peer_outputs[case]
    ours = Path(mergewise.merge(recipe, tmp_path / "merged", seed=SEED, quiet=True))

    mismatches = vocabulary_mismatches(ours, mergekit_out, fixed_ids=case not in ORDER_VARIES)

    assert not mismatches, f"{case}:\n" + "\n".join(mismatches)


def test_the_output_vocabulary_and_its_rows(models, tmp_path):
    """The union appends the expert's PAD; the base's row for it is the expert's own (its one holder),
    so task arithmetic keeps it; padding rows merge each input's mean row (about the merged mean)."""
    recipe = _task_arithmetic(models, models.pad, tokenizer={"source": "union", "pad_to_multiple_of": 64})
    merged = Path(mergewise.merge(recipe, tmp_path / "merged", seed=SEED, quiet=True))

    tokenizer = AutoTokenizer.from_pretrained(merged)
    state, expert = read_state_dict(merged), read_state_dict(models.pad)
    assert len(tokenizer) == 257 and tokenizer.convert_tokens_to_ids("<|pad|>") == 256
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == 320
    for name in VOCABULARY_TENSORS:
        assert state[name].shape == (320, 64)
        assert torch.equal(state[name][256], expert[name][256])
        padding = state[name][257:].float()
        assert torch.equal(padding, padding[:1].expand(63, 64))
        torch.testing.assert_close(padding[0], state[name][:257].float().mean(0), rtol=0.02, atol=1e-4)
    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = tokenizer("merging models <|pad|>", return_tensors="pt")["input_ids"]
    assert ids[0, -1] == 256 and model(ids).logits.shape == (1, ids.shape[1], 320)


def test_one_shared_vocabulary_is_read_as_stored(models):
    """Inputs of the output's very vocabulary need no re-indexing: their rows stream as stored."""
    config = MergeConfig(**_task_arithmetic(models, models.pad, tokenizer_source=str(models.pad)))
    plan = build_plan(config, Path.cwd())

    vocabulary_jobs = [job for job in plan.jobs if job.name in VOCABULARY_TENSORS]
    assert [job.shape for job in vocabulary_jobs] == [(257, 64)] * 2
    for job in vocabulary_jobs:
        assert job.inputs[0].vocabulary is None  # the expert: its own vocabulary
        assert job.base.vocabulary is not None  # the base lacks <|pad|>


# ------------------------------------------------------------------------------------- bad settings
def _block(models: Models, tokens: dict) -> dict:
    return _task_arithmetic(models, models.pad, tokenizer={"source": "union", "tokens": tokens})


BAD_TOKENS = {
    "source lacks the token": (
        lambda m: {"<|pad|>": {"source": str(m.base)}},
        ["tokenizer.tokens.<|pad|>.source:", "has no token '<|pad|>'"],
    ),
    "source not a recipe model": (
        lambda m: {"<|pad|>": {"source": str(m.first)}},
        ["tokenizer.tokens.<|pad|>.source:", "is not one of the recipe's models"],
    ),
    "model_token of another model": (
        lambda m: {"<|pad|>": {"source": {"kind": "model_token", "model": str(m.first), "token": "<s>"}}},
        ["tokenizer.tokens.<|pad|>.source.model:", "is not one of the recipe's models"],
    ),
    "model_token the model lacks": (
        lambda m: {"<|pad|>": {"source": {"kind": "model_token", "model": str(m.base), "token": "<|pad|>"}}},
        ["tokenizer.tokens.<|pad|>.source.token:", "has no token '<|pad|>'"],
    ),
    "model_token id past the rows": (
        lambda m: {"<|pad|>": {"source": {"kind": "model_token", "model": str(m.base), "token_id": 256}}},
        ["tokenizer.tokens.<|pad|>.source.token_id:", "past the 256 rows"],
    ),
    "needed source missing": (
        lambda m: {"<s>": {"force": True}},
        ["tokenizer.tokens.<s>.source:", "needs a source (it is forced)"],
    ),
    "unknown source kind": (lambda m: {"<s>": {"source": {"kind": "mean"}}}, ["tokenizer.tokens.<s>.source"]),
}


@pytest.mark.parametrize("case", BAD_TOKENS)
def test_a_bad_token_setting_is_one_error_naming_its_key(case, models, tmp_path, capsys):
    tokens, named = BAD_TOKENS[case]
    config = write_recipe(tmp_path, _block(models, tokens(models)))
    assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", *named)


def test_a_missing_tokenizer_source_is_one_error_naming_the_key(models, tmp_path, capsys):
    config = write_recipe(tmp_path, _task_arithmetic(models, models.pad, tokenizer={"source": "./nowhere"}))
    assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", "tokenizer.source:", "not found")


def test_a_new_vocabulary_with_a_recipe_block_is_refused(models, tmp_path, capsys):
    """The aim: stage reads the base's rows as stored, which a new vocabulary re-indexes."""
    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"")
    recipe = {
        **_task_arithmetic(models, models.pad, tokenizer_source="union"),
        "aim": {"omega": 0.3, "stats": str(stats)},
    }
    config = write_recipe(tmp_path, recipe)
    assert_refused(capsys, merge(config, tmp_path / "out"), tmp_path / "out", "tokenizer:", "aim:")


# --------------------------------------------------------------------------- what the inputs may claim
def test_padding_is_bounded_by_the_vocabulary(models, tmp_path):
    """pad_to_multiple_of: 10**12 asked for a trillion rows (7 GB, then a MemoryError)."""
    recipe = _task_arithmetic(models, models.pad, tokenizer={"source": "union", "pad_to_multiple_of": 10**12})
    config = write_recipe(tmp_path, recipe)
    run_measured("merge", str(config), str(tmp_path / "out"), "--quiet").assert_one_error(
        "tokenizer.pad_to_multiple_of: 1000000000000 is more than the 257 tokens of the output vocabulary"
    )
    assert not (tmp_path / "out").exists()


def test_a_config_claiming_more_rows_than_the_weights_hold_does_not_grow_the_vocabulary(models, tmp_path):
    """The tokenizer's token past the embedding's 256 rows stays out, whatever config.json claims."""
    claiming = Path(shutil.copytree(models.long_tokenizer, tmp_path / "claiming"))
    config = json.loads((claiming / "config.json").read_text())
    (claiming / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    merged = Path(
        mergewise.merge(_task_arithmetic(models, claiming, tokenizer_source="union"), tmp_path / "out", quiet=True)
    )
    assert "<|unused|>" not in AutoTokenizer.from_pretrained(merged).get_vocab()
    assert all(tensor.shape[0] == 256 for name, tensor in read_state_dict(merged).items() if name in VOCABULARY_TENSORS)


def test_a_union_of_thousands_of_new_tokens_is_built_in_one_pass(models, tmp_path):
    """Added one at a time, 1k / 2k / 4k new tokens took 0.2 / 1.5 / 9 s (the tokenizer rebuilt its
    matcher per token)."""
    many = with_added_tokens(models.base, tmp_path / "many", [f"<|extra_{index}|>" for index in range(4000)], seed=3)
    config = MergeConfig(**_task_arithmetic(models, many, tokenizer_source="union"))
    started = time.perf_counter()
    plan = build_plan(config, Path.cwd())
    assert time.perf_counter() - started < 3
    assert plan.vocabulary.real == 4256 and plan.vocabulary.tokens["<|extra_3999|>"] == 4255


def test_an_embedding_without_rows_is_refused_before_rows_are_sized_by_its_width(models, tmp_path, capsys):
    """A tensor of no rows holds no bytes whatever its width: re-indexing it into the output vocabulary
    would allocate rows of that width out of nothing."""
    empty = Path(shutil.copytree(models.pad, tmp_path / "empty"))
    tensors = load_file(empty / "model.safetensors")
    tensors["model.embed_tokens.weight"] = torch.empty(0, 64, dtype=torch.bfloat16)
    save_file(tensors, empty / "model.safetensors", metadata={"format": "pt"})
    config = write_recipe(tmp_path, _task_arithmetic(models, empty, tokenizer_source="union"))
    assert_refused(
        capsys,
        merge(config, tmp_path / "out"),
        tmp_path / "out",
        "tensor model.embed_tokens.weight",
        str(empty),
        "has shape [0, 64]: no rows to re-index",
    )


def test_a_tokenizer_config_transformers_could_not_write_back_is_refused_before_the_merge(models, tmp_path, capsys):
    """A new vocabulary's tokenizer is written by transformers after the merge; a chat template
    mapped to null failed there (found by fuzzing)."""
    odd = Path(shutil.copytree(models.pad, tmp_path / "odd"))
    config_path = odd / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": {"": None}}))
    config = write_recipe(tmp_path, _task_arithmetic(models, odd, tokenizer_source="union"))
    assert_refused(
        capsys,
        merge(config, tmp_path / "out"),
        tmp_path / "out",
        str(config_path),
        "chat_template.str: Input should be a valid string",
    )
