"""The models the benchmarks run on, built once and cached: random bf16 Llamas written tensor by tensor
as sharded safetensors (W1 and its fine-tunes for the comparisons with mergekit, deeper ones for
Mediator's build memory, small ones for calibration) and a zoo's Mediator model at one setting."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from common import BENCHMARKS, CommandFailed, mergewise_command, run_measured
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from mergewise.evaluate.comparison import mediator_recipe
from mergewise.zoo.manifest import Zoo

sys.path.insert(0, str(BENCHMARKS.parent))  # the repository: tests.support builds the models
from tests.support.tiny_models import build_fine_tune, save_tokenizer, tiny_config  # noqa: E402

SHARD_BYTES = 200 * 10**6
NUM_FINE_TUNES = 3
FINE_TUNE_NOISE = 0.01
MEDIATOR_DEFAULT = ("bfloat16", "auto", 1.5)  # (recipe dtype, code, memory budget): mergewise's defaults


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 1024
    layers: int = 12
    intermediate: int = 2816
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 8

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


def llama_tensors(shape: LlamaShape, generator: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """Random bf16 tensors named as in `LlamaForCausalLM`, one at a time so memory stays small."""

    def weight(*dims: int) -> torch.Tensor:
        return (0.02 * torch.randn(dims, generator=generator)).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1 + 0.02 * torch.randn(shape.hidden, generator=generator)).to(torch.bfloat16)

    h, kv, mlp = shape.hidden, shape.kv_dim, shape.intermediate
    yield "model.embed_tokens.weight", weight(shape.vocab, h)
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", norm()
        for projection, dims in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            yield f"{prefix}.self_attn.{projection}.weight", weight(*dims)
        yield f"{prefix}.post_attention_layernorm.weight", norm()
        for projection, dims in (("gate_proj", (mlp, h)), ("up_proj", (mlp, h)), ("down_proj", (h, mlp))):
            yield f"{prefix}.mlp.{projection}.weight", weight(*dims)
    yield "model.norm.weight", norm()
    yield "lm_head.weight", weight(shape.vocab, h)


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Save tensors as `model-XXXXX-of-YYYYY.safetensors` shards plus the HF index, one shard in memory."""
    names_by_shard: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_size = total_size = 0

    def flush() -> None:
        nonlocal shard_size
        save_file(shard, out_dir / f"shard-{len(names_by_shard) + 1}.tmp", metadata={"format": "pt"})
        names_by_shard.append(list(shard))
        shard.clear()
        shard_size = 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_size + size > shard_bytes:
            flush()
        shard[name] = tensor
        shard_size += size
        total_size += size
    flush()

    weight_map = {}
    for number, names in enumerate(names_by_shard, start=1):
        file_name = f"model-{number:05d}-of-{len(names_by_shard):05d}.safetensors"
        (out_dir / f"shard-{number}.tmp").rename(out_dir / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def llama_config(shape: LlamaShape) -> LlamaConfig:
    """The bf16 `LlamaForCausalLM` config of `shape`, with an untied lm_head."""
    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def parameter_count(shape: LlamaShape) -> int:
    per_layer = 2 * shape.hidden * (shape.hidden + shape.kv_dim) + 3 * shape.hidden * shape.intermediate
    return shape.layers * per_layer + 2 * shape.vocab * shape.hidden


def build_workload(workdir: Path, shape: LlamaShape, seed: int = 0) -> Path:
    """Build (once) base + fine-tunes for `shape` under `workdir`; return the workload folder."""
    root = workdir / f"llama-h{shape.hidden}-l{shape.layers}"
    done_marker = root / "COMPLETE"
    if done_marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    base = root / "base"
    base.mkdir(parents=True)
    print(f"building workload in {root} ...", flush=True)
    start = time.perf_counter()
    llama_config(shape).save_pretrained(base)
    save_tokenizer(base)
    write_sharded(llama_tensors(shape, torch.Generator().manual_seed(seed)), base)
    for index in range(1, NUM_FINE_TUNES + 1):
        build_fine_tune(base, root / f"ft{index}", seed=seed + index, noise=FINE_TUNE_NOISE)
    done_marker.touch()
    print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def random_tiny_llama(folder: Path, depth: int, hidden: int) -> int:
    """A random bf16 Llama of `depth` layers with the tests' tiny tokenizer (a vocabulary of 256, as
    `tests.support` builds it); returns its size in bytes."""
    config = tiny_config(
        "llama",
        num_layers=depth,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_heads=hidden // 64,
        num_kv_heads=hidden // 256,
        vocab_size=256,
        max_positions=512,
    )
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    generator = torch.Generator().manual_seed(0)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in shapes.items():
            tensor = torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=generator)
            yield name, tensor.to(torch.bfloat16)

    folder.mkdir(parents=True)
    write_sharded(tensors(), folder)
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    save_tokenizer(folder)
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def intermediate_size(hidden: int) -> int:
    """8/3 of the width rounded up to a multiple of 64, as real models size it (transformers'
    grouped expert matmuls need rows of a multiple of 16 bytes)."""
    return -(-hidden * 8 // 3 // 64) * 64


def random_model(folder: Path, arch: str, depth: int, hidden: int) -> int:
    """A random bf16 model of `arch` (a mixture of experts: `mixtral`, 4 experts; a vision-language
    model: `llava`, a one-layer vision tower) with `depth` decoder layers of width `hidden`, saved by
    transformers as checkpoints on the Hub are (one matrix per expert; the language model under
    `language_model.`); returns its size in bytes."""
    from transformers import AutoModelForImageTextToText, LlavaConfig

    text = tiny_config(
        "mixtral" if arch == "mixtral" else "llama",
        num_layers=depth,
        hidden_size=hidden,
        intermediate_size=intermediate_size(hidden),
        num_heads=hidden // 64,
        num_kv_heads=hidden // 256,
        vocab_size=256,
        max_positions=512,
    )
    if arch == "mixtral":
        config, auto = text, AutoModelForCausalLM
    else:
        vision = {"model_type": "clip_vision_model", "hidden_size": 256, "intermediate_size": 1024}
        vision |= {"num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 56, "patch_size": 14}
        config, auto = (
            LlavaConfig(text_config=text.to_dict(), vision_config=vision, image_token_index=255),
            AutoModelForImageTextToText,
        )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = auto.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def tensor_files(folder: Path) -> dict[str, Path]:
    """Which safetensors file of `folder` holds each tensor."""
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files


def mediator_folder(work: Path, dtype: str, code: str, budget: float, router_kind: str | None = None) -> Path:
    kind = f"-router-{router_kind}" if router_kind else ""
    return work / "models" / f"mediator-{dtype}-{code}-b{budget:g}{kind}"


def build_mediator(
    zoo: Zoo, work: Path, dtype: str, code: str, budget: float, router_kind: str | None = None
) -> tuple[Path, dict]:
    """The zoo's Mediator folder for one setting (`router_kind`: another router than the default),
    built once by a measured `mergewise mediator build`, and its build record (peak RSS, seconds,
    manifest, or the error that refused the setting)."""
    out = mediator_folder(work, dtype, code, budget, router_kind)
    record_path = work / "builds" / f"{out.name}.json"
    if not record_path.is_file():
        recipe = work / "recipes" / f"{out.name}.yml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        router = {"router": {"kind": router_kind}} if router_kind else {}
        recipe.write_text(yaml.safe_dump(mediator_recipe(zoo, dtype, memory_budget=budget, code=code, **router)))
        try:
            build = run_measured(
                mergewise_command("mediator", "build", str(recipe), str(out), "--overwrite", "--quiet", "--seed", "0")
            )
            record = {"peak_rss_mib": build.peak_rss_mib, "seconds": build.wall_s}
        except CommandFailed as error:
            record = {"error": str(error).strip().splitlines()[-1]}
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record))
    record = json.loads(record_path.read_text())
    if "error" not in record:
        record["manifest"] = json.loads((out / "mediator" / "mediator.json").read_text())
    return out, record
