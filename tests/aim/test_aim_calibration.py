"""AIM calibration against the reference code's conventions, written out here independently of
mergewise: each document stripped and tokenized with the tokenizer's default special tokens (a BOS),
the length filter counting them, the kept documents concatenated in their given order and cut into
whole blocks (the trailing partial block dropped), and Σ_blocks mean_tokens |x| from plain forward
pre-hooks. Also: calibrating leaves process-wide state as it found it."""

from __future__ import annotations

import ctypes
import json
import random
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from tokenizers import processors
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergewise.aim import CalibrationSettings, calibrate, load_statistics
from mergewise.aim.data import DOCUMENT_CONVENTIONS, blocks_from_documents, hub_documents, read_documents
from mergewise.checkpoint import ModelFolder
from mergewise.cli import main
from tests.support.processes import run_measured

SAMPLES, SEQ_LEN = 24, 16
WORDS = "the quick brown fox jumps over lazy dog model merging adds task vectors weights layer average sign".split()


@pytest.fixture(scope="module")
def bos_base(tiny_family, tmp_path_factory):
    """make(arch): a copy of the tiny base whose tokenizer prepends a BOS by default, as Llama's does
    (the tiny tokenizer adds no special tokens, which would hide how they are counted)."""
    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            folder = tmp_path_factory.mktemp(f"bos-{arch}") / "base"
            shutil.copytree(tiny_family(arch).base, folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            bos = (tokenizer.bos_token, tokenizer.bos_token_id)
            tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos[0]} $A", special_tokens=[bos]
            )
            tokenizer.save_pretrained(folder)
            built[arch] = folder
        return built[arch]

    return make


@pytest.fixture(scope="module")
def documents_jsonl(tmp_path_factory) -> Path:
    """Documents of 1 to 8 words, plus the cases where the conventions matter: one of exactly
    SEQ_LEN tokens before its BOS (too long once the BOS is counted), an empty one (a lone BOS),
    and one with surrounding whitespace."""
    generator = random.Random(0)
    texts = [" ".join(generator.choices(WORDS, k=generator.randint(1, 8))) for _ in range(30)]
    texts[3] = " ".join(["the"] * SEQ_LEN)
    texts[5] = ""
    texts[7] = "\n  the lazy dog  \n"
    path = tmp_path_factory.mktemp("aim-calibration") / "documents.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def reference_blocks(texts: list[str], tokenizer, samples: int, seq_len: int) -> list[torch.Tensor]:
    """The reference's get_calib_dataset on data passed in (so not shuffled)."""
    kept = []
    for text in texts:
        encoded = tokenizer.encode(text.strip())
        if len(encoded) > seq_len:
            continue
        sample = torch.tensor([encoded], dtype=torch.long)
        if sample.numel() == 0:
            continue
        kept.append(sample)
        if len(kept) == samples:
            break
    tokens = torch.cat(kept, dim=1)
    n_split = tokens.shape[1] // seq_len
    return [tokens[:, i * seq_len : (i + 1) * seq_len] for i in range(n_split)]


def reference_statistics(
    base: Path, blocks: list[torch.Tensor], experts: tuple | None = None
) -> dict[str, torch.Tensor]:
    """Σ_blocks mean_tokens |x| of every non-embedding module's input, from plain pre-hooks on the
    whole float32 model; with `experts` (the checkpoint names of expert {e}'s gate/up matrices and of
    its down matrix, under a layer's MoE block), each expert's inputs too, as transformers' eager
    expert loop passes them to `F.linear`."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, experts_implementation="eager").eval()
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, inputs: torch.Tensor) -> None:
        tokens = inputs.reshape(-1, inputs.shape[-1])  # (batch, seq, channels), or a MoE's (tokens, channels)
        sums[name] = sums.get(name, 0) + tokens.abs().mean(dim=0).double()

    def hook(name):
        def record(module, args):
            add(name, args[0])

        return record

    for name, module in model.named_modules():
        if "weight" in module._parameters and not isinstance(module, nn.Embedding):
            module.register_forward_pre_hook(hook(f"{name}.weight"))
    expert_weights = {}  # data pointer of an expert's slice -> the checkpoint names it is stored as
    if experts is not None:
        (gate_up_names, down_name), block = experts
        for name, module in model.named_modules():
            if "gate_up_proj" in module._parameters:
                layer = name.rpartition(".experts")[0].replace(".mlp", block)
                for e in range(module.gate_up_proj.shape[0]):
                    expert_weights[module.gate_up_proj[e].data_ptr()] = [
                        f"{layer}.{n.format(e=e)}" for n in gate_up_names
                    ]
                    expert_weights[module.down_proj[e].data_ptr()] = [f"{layer}.{down_name.format(e=e)}"]
    linear = torch.nn.functional.linear

    def recording_linear(inputs, weight, bias=None):
        for name in expert_weights.get(weight.data_ptr(), []):
            add(name, inputs)
        return linear(inputs, weight, bias)

    with torch.no_grad(), mock.patch.object(torch.nn.functional, "linear", recording_linear):
        for block in blocks:
            model(block)
    return {name: total.float() for name, total in sums.items()}


def texts_of(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


# transformers renames these module weights between the checkpoint and the model; a merge reads the
# checkpoint's names, so the statistics carry those
CHECKPOINT_NAMES = {"mixtral": (".mlp.gate.", ".block_sparse_moe.gate.")}
# each expert's matrices in the checkpoint (one per expert; transformers fuses them): gate and up, down
# and the MoE block's name in the checkpoint
QWEN_EXPERTS = (("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight"), "experts.{e}.down_proj.weight")
EXPERT_NAMES = {
    "mixtral": ((("experts.{e}.w1.weight", "experts.{e}.w3.weight"), "experts.{e}.w2.weight"), ".block_sparse_moe"),
    "qwen2_moe": (QWEN_EXPERTS, ".mlp"),
    "qwen3_moe": (QWEN_EXPERTS, ".mlp"),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_statistics_match_the_reference_conventions(arch, bos_base, documents_jsonl, tmp_path):
    base = bos_base(arch)
    blocks = reference_blocks(texts_of(documents_jsonl), AutoTokenizer.from_pretrained(base), SAMPLES, SEQ_LEN)
    module_name, stored_name = CHECKPOINT_NAMES.get(arch, ("", ""))
    expected = {
        name.replace(module_name, stored_name) if module_name else name: vector
        for name, vector in reference_statistics(base, blocks, EXPERT_NAMES.get(arch)).items()
    }
    assert set(expected) - {"lm_head.weight"} <= set(ModelFolder(base).tensors)  # GPT-2 ties its head
    settings = CalibrationSettings(data=str(documents_jsonl), samples=SAMPLES, seq_len=SEQ_LEN)
    for stream_layers in (False, True):
        stats = load_statistics(
            calibrate(
                base, tmp_path / f"{stream_layers}.safetensors", settings, stream_layers=stream_layers, quiet=True
            )
        )
        assert sorted(stats.vectors) == sorted(expected)
        for name, vector in expected.items():
            torch.testing.assert_close(stats.vectors[name], vector, rtol=1e-5, atol=0, msg=f"{arch} {name}")
        assert stats.metadata["pass"] == ("stream_layers" if stream_layers else "in_memory")
        assert stats.metadata["blocks"] == str(len(blocks))
        assert stats.metadata["tokens"] == str(len(blocks) * SEQ_LEN)
        assert DOCUMENT_CONVENTIONS.items() <= stats.metadata.items()
        if arch == "gpt2":  # Conv1D stores its weight as (in, out)
            assert stats.input_axis("transformer.h.0.mlp.c_fc.weight") == 0


def test_blocks_keep_the_document_order_and_drop_the_partial_block(bos_base, documents_jsonl):
    tokenizer = AutoTokenizer.from_pretrained(bos_base("llama"))
    texts = list(read_documents(str(documents_jsonl), SEQ_LEN))
    encoded = [tokenizer.encode(text.strip()) for text in texts]
    assert all(tokens[0] == tokenizer.bos_token_id for tokens in encoded)
    assert len(encoded[3]) == SEQ_LEN + 1 and encoded[5] == [tokenizer.bos_token_id]

    blocks = blocks_from_documents(texts, tokenizer, len(texts), SEQ_LEN, str(documents_jsonl))
    usable = [token for tokens in encoded if len(tokens) <= SEQ_LEN for token in tokens]
    whole = len(usable) // SEQ_LEN * SEQ_LEN
    assert whole < len(usable), "the data should leave a partial block"
    assert all(block.shape == (1, SEQ_LEN) for block in blocks)
    assert torch.cat(blocks, dim=1)[0].tolist() == usable[:whole]  # file order, tail dropped
    first_samples = blocks_from_documents(texts, tokenizer, SAMPLES, SEQ_LEN, "data")
    assert [block.tolist() for block in first_samples] == [
        block.tolist() for block in reference_blocks(texts, tokenizer, SAMPLES, SEQ_LEN)
    ]


def test_hub_dataset_documents_keep_their_order(monkeypatch):
    datasets = pytest.importorskip("datasets")
    texts = [f"document {number}" for number in range(50)]
    stored = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts, "id": range(50)})})
    monkeypatch.setattr(datasets, "load_dataset", lambda name: stored)
    assert list(hub_documents("user/corpus")) == texts


def test_fewer_tokens_than_one_block_is_one_clear_error(bos_base, tmp_path, capsys):
    data = tmp_path / "short.txt"
    data.write_text("the lazy dog\n\n\n\nthe fox\n\n")
    command = ["calibrate", str(bos_base("llama")), str(tmp_path / "s.safetensors"), "--data", str(data)]
    capsys.readouterr()  # what building the base printed, when this test is the first to need it
    assert main([*command, "--seq-len", "64", "--quiet"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: --data {data}: 9 tokens in 2 usable documents, fewer than one block of --seq-len 64"]
    assert not (tmp_path / "s.safetensors").exists()


class LibraryRecordingMallopt(ctypes.CDLL):
    """A C library whose `mallopt` is recorded instead of called."""

    calls: list[tuple] = []

    def __getattr__(self, name):
        if name == "mallopt":
            return lambda *args: self.calls.append(args) or 1
        return super().__getattr__(name)


def test_calibration_leaves_process_state_alone(tiny_family, documents_jsonl, tmp_path, monkeypatch):
    """Neither pass swaps out nn.Module.register_parameter (not even while building the model) nor
    tunes glibc's allocator: both are process-wide, and the CLI owns the allocator."""
    register_parameter = nn.Module.register_parameter
    patched_while_registering = []
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, parameter: patched_while_registering.append(
            nn.Module.register_parameter is not register_parameter
        )
    )
    monkeypatch.setattr(LibraryRecordingMallopt, "calls", [])
    monkeypatch.setattr(ctypes, "CDLL", LibraryRecordingMallopt)
    monkeypatch.setattr(ctypes, "cdll", ctypes.LibraryLoader(LibraryRecordingMallopt))
    settings = CalibrationSettings(data=str(documents_jsonl), samples=8, seq_len=SEQ_LEN)
    try:
        for stream_layers in (False, True):
            calibrate(
                tiny_family("llama").base,
                tmp_path / f"{stream_layers}.safetensors",
                settings,
                stream_layers=stream_layers,
                quiet=True,
            )
    finally:
        handle.remove()
    assert patched_while_registering and not any(patched_while_registering)
    assert nn.Module.register_parameter is register_parameter
    assert LibraryRecordingMallopt.calls == []


@pytest.mark.integration
def test_a_document_of_megabytes_is_skipped_in_flat_memory(tiny_family, tmp_path):
    """A text of 10 MB without a blank line is one document, far too long for a block: it is skipped
    as the reference skips it, but unread and untokenized (tokenized whole, it took 2.5 GB), and the
    statistics are those of the data without it."""
    generator = random.Random(1)
    documents = [" ".join(generator.choices(WORDS, k=generator.randint(3, 8))) for _ in range(40)]
    plain, padded = tmp_path / "plain.txt", tmp_path / "padded.txt"
    plain.write_text("\n\n".join(documents))
    with padded.open("w") as file:
        file.write(("the lazy dog " * 800 + "\n") * 1000 + "\n\n" + "\n\n".join(documents))
    assert padded.stat().st_size > 10_000_000
    base = tiny_family("llama").base
    options = ["--seq-len", str(SEQ_LEN), "--samples", "8", "--quiet"]
    run_measured(
        "calibrate", str(base), str(tmp_path / "padded.safetensors"), "--data", str(padded), *options
    ).assert_bounded()
    assert main(["calibrate", str(base), str(tmp_path / "plain.safetensors"), "--data", str(plain), *options]) == 0
    padded_stats, plain_stats = (load_statistics(tmp_path / f"{name}.safetensors") for name in ("padded", "plain"))
    assert padded_stats.metadata["blocks"] == plain_stats.metadata["blocks"]
    for name, vector in plain_stats.vectors.items():
        torch.testing.assert_close(padded_stats.vectors[name], vector, rtol=0, atol=0)
