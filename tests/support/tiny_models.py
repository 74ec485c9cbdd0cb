"""Tiny random Hugging Face causal-LM checkpoints, built offline.

Tests, benchmarks and the demo need real checkpoint folders (config, safetensors, tokenizer)
without downloading anything. A "fine-tune" here is the base plus seeded gaussian noise scaled
to each tensor, which is enough to exercise every merge method's arithmetic.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Gemma2Config,
    Gemma3Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    LlavaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen2VLConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "gpt2")
# Further dense families, in the architecture matrix (tests/test_architectures.py) only
MORE_DENSE_ARCHITECTURES = {"qwen3": Qwen3Config, "gemma2": Gemma2Config, "phi3": Phi3Config, "gpt_neox": GPTNeoXConfig}
# Mixture-of-experts models, whose checkpoints name their experts' weights one matrix per expert and
# transformers fuses them into 3-D tensors: 4 experts, 2 per token (Qwen2-MoE adds a shared expert).
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
MOE_OPTIONS = {
    "mixtral": (MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        Qwen2MoeConfig,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
        },
    ),
    "qwen3_moe": (Qwen3MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
}
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

# A few sentences to train the tokenizer on: enough words for a vocabulary of a few hundred.
_TRAINING_TEXT = """
Model merging combines the weights of several fine-tuned language models into one model.
Task arithmetic adds the scaled differences between each fine-tune and their common base.
TIES trims small updates, elects a sign for every parameter and averages the agreeing values.
DARE drops most of each update at random and rescales the rest to keep its expected size.
Spherical interpolation follows the arc between two weight vectors instead of the chord.
Model stock picks an interpolation ratio from the angle between the fine-tuned updates.
A frankenmerge stacks layer ranges taken from different models into a deeper network.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
Numbers like one two three four five six seven eight nine ten help the vocabulary grow.
Attention heads share keys and values across groups to save memory during generation.
"""


@dataclass(frozen=True)
class Family:
    """A base checkpoint and fine-tunes of it: the usual input of a merge."""

    base: Path
    fine_tunes: tuple[Path, ...]


@cache
def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on the built-in text; cached since every model reuses it."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT.split("\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def tiny_config(
    arch: str,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 256,
    max_positions: int = 128,
) -> PretrainedConfig:
    """The config of a tiny `arch` model; ties embeddings only where the real family does."""
    token_ids = _tokenizer(vocab_size)
    ids = {
        "bos_token_id": token_ids.bos_token_id,
        "eos_token_id": token_ids.eos_token_id,
        "pad_token_id": token_ids.pad_token_id,
    }
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            tie_word_embeddings=True,
            **ids,
        )
    config_classes = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "mistral": MistralConfig,
        "gemma": GemmaConfig,
        **{arch: config_class for arch, config_class in MORE_DENSE_ARCHITECTURES.items()},
    }
    config_class, options = MOE_OPTIONS.get(arch, (config_classes.get(arch), {}))
    if config_class is None:
        known = ", ".join((*ARCHITECTURES, *MORE_DENSE_ARCHITECTURES, *MOE_ARCHITECTURES))
        raise ValueError(f"unknown architecture {arch!r}; expected one of {known}")
    return config_class(
        **options,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=arch in ("gemma", "gemma2"),
        **ids,
    )


def save_tokenizer(out_dir: str | Path, vocab_size: int = 256) -> None:
    """Write the tiny tokenizer so `AutoTokenizer.from_pretrained(out_dir)` works."""
    _tokenizer(vocab_size).save_pretrained(out_dir)


def _spread_constant_tensors(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Jitter parameters that initialise to a constant (norms, biases).

    Real checkpoints have varied norms and biases; constant ones would make a fine-tune's
    relative noise vanish on them and leave those merge code paths untested.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and parameter.std() == 0:
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))


def build_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: int | str | None = None,
    **config_options,
) -> Path:
    """Save a random `arch` model (safetensors, sharded when `shard_size` is given) and a tokenizer.

    `config_options` go to `tiny_config` (num_layers, hidden_size, num_kv_heads, vocab_size, ...).
    """
    out_dir = Path(out_dir)
    config = tiny_config(arch, **config_options)
    with torch.random.fork_rng():  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    _spread_constant_tensors(model, torch.Generator().manual_seed(seed))
    model.to(dtype)
    model.save_pretrained(out_dir, **({"max_shard_size": shard_size} if shard_size is not None else {}))
    save_tokenizer(out_dir, config.vocab_size)
    return out_dir


VISION_LANGUAGE_ARCHITECTURES = ("gemma3", "llava", "qwen2_vl")


def build_tiny_vision_language_model(
    out_dir: str | Path,
    *,
    arch: str = "gemma3",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vision_layers: int = 1,
    hub_layout: bool = False,
) -> Path:
    """A random multimodal model (a vision tower of `vision_layers` layers, a projector and a language
    model of two layers under `text_config`) with the tiny tokenizer, saved as transformers saves it:
    Gemma 3, LLaVA (a CLIP tower and a Llama) or Qwen2-VL. `hub_layout` names a Gemma 3's vision tower
    as the Hub's Gemma 3 checkpoints do (`vision_tower.vision_model.*`, which transformers also loads)."""
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text |= {"num_key_value_heads": 1, "vocab_size": 256}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": vision_layers, "num_attention_heads": 2}
    vision |= {"image_size": 28, "patch_size": 14}
    if arch == "gemma3":  # alternating sliding-window and full attention, as Gemma 3 has them
        config: PretrainedConfig = Gemma3Config(
            text_config=text
            | {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
            vision_config=vision,
            mm_tokens_per_image=4,
        )
    elif arch == "llava":
        config = LlavaConfig(
            text_config=text | {"model_type": "llama"},
            vision_config=vision | {"model_type": "clip_vision_model"},
            image_token_index=255,
        )
    elif arch == "qwen2_vl":
        config = Qwen2VLConfig(
            text_config=text | {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
            vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2},
            image_token_id=255,
            video_token_id=254,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(VISION_LANGUAGE_ARCHITECTURES)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.to(dtype).save_pretrained(out_dir)
    if hub_layout:
        if arch != "gemma3":
            raise ValueError("hub_layout names a Gemma 3's tensors only")
        weights = Path(out_dir) / "model.safetensors"
        stored = load_file(weights)
        prefix = "vision_tower."
        renamed = {
            f"{prefix}vision_model.{name.removeprefix(prefix)}" if name.startswith(prefix) else name: tensor
            for name, tensor in stored.items()
        }
        save_file(renamed, weights, metadata={"format": "pt"})
    save_tokenizer(out_dir, 256)
    return Path(out_dir)


def perturb(tensor: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """`tensor` plus gaussian noise whose RMS is `noise` times the tensor's RMS (same dtype)."""
    values = tensor.float()
    scale = values.square().mean().sqrt()
    noisy = values + noise * scale * torch.randn(values.shape, generator=generator)
    return noisy.to(tensor.dtype)


def build_fine_tune(base_dir: str | Path, out_dir: str | Path, *, seed: int, noise: float = 0.01) -> Path:
    """Copy `base_dir` to `out_dir` with every floating tensor perturbed by relative `noise`.

    Works one safetensors file at a time, so memory stays at one shard even for large bases;
    shard layout, index and tokenizer/config files are kept as they are.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(base_dir.iterdir()):
        if path.suffix != ".safetensors":
            if path.is_file():
                shutil.copy2(path, out_dir / path.name)
            continue
        tensors = load_file(path)
        for name in sorted(tensors):
            if tensors[name].is_floating_point():
                tensors[name] = perturb(tensors[name], noise, generator)
        save_file(tensors, out_dir / path.name, metadata={"format": "pt"})
    return out_dir


def with_added_tokens(
    model_dir: str | Path, out_dir: str | Path, tokens: Sequence[str], *, seed: int, special: bool = True
) -> Path:
    """Copy a single-file model folder with `tokens` appended to its tokenizer (special tokens, like a
    fine-tune's PAD or chat markers, unless `special` is False) and one random row per new token
    appended to its embedding and untied head, growing config.json's vocab_size to match."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shutil.copytree(model_dir, out_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tokenizer.add_tokens([AddedToken(token, special=special, normalized=not special) for token in tokens])
    tokenizer.save_pretrained(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] = len(tokenizer)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(model_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight"):
        if name in tensors:
            rows = tensors[name]
            new = perturb(rows[torch.arange(len(tokens)) % len(rows)], 1.0, generator)  # rows of a typical size
            tensors[name] = torch.cat([rows, new])
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def build_family(
    arch: str,
    root: str | Path,
    *,
    num_fine_tunes: int = 3,
    noise: float = 0.01,
    seed: int = 0,
    **model_options,
) -> Family:
    """Build `root/base` and `root/ft1..ftN` (fine-tune i seeded `seed + i`); a multimodal `arch`
    takes the `dtype`, `vision_layers` and `hub_layout` options."""
    root = Path(root)
    if arch in VISION_LANGUAGE_ARCHITECTURES:
        base = build_tiny_vision_language_model(root / "base", arch=arch, seed=seed, **model_options)
    else:
        base = build_tiny_model(arch, root / "base", seed=seed, **model_options)
    fine_tunes = tuple(
        build_fine_tune(base, root / f"ft{index}", seed=seed + index, noise=noise)
        for index in range(1, num_fine_tunes + 1)
    )
    return Family(base, fine_tunes)


def read_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint folder, sharded or not, by name."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(model_dir / name))
    return state


def build_lora_adapter(
    base: str | Path, folder: str | Path, *, rank: int = 4, seed: int = 0, **options
) -> dict[str, torch.Tensor]:
    """A PEFT LoRA (on q/v unless `options` say otherwise) of `base` with random (not zero) B factors,
    saved in `folder`; returns the weights PEFT's `merge_and_unload` makes of it."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    options = {"lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"], **options}
    peft_model = get_peft_model(model, LoraConfig(r=rank, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(folder)
    return {name: tensor for name, tensor in peft_model.merge_and_unload().state_dict().items()}
