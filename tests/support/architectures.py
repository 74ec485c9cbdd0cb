"""The architecture matrix: what mergewise does with each model family, as tests/test_architectures.py
checks it on tiny random checkpoints saved by transformers. docs/reference/architectures.md is this
table rendered (`python -m tests.support.architectures > docs/reference/architectures.md`); a test
keeps the two equal, so the page says what the tests show."""

from __future__ import annotations

WORKS = "yes"

FEATURES = {
    "merge": "a TIES merge of two fine-tunes loads in transformers with every tensor and generates",
    "slices": "a passthrough of layer slices from two fine-tunes (3 layers out of 2 + 1) loads and generates",
    "calibrate": "AIM statistics of the base: in memory and layer by layer (`--stream-layers`) agree within 1e-5",
    "mediator": "`mediator build`, then `generate`: a prompt routed to a task answers as that task's exported expert",
    "serve": "`mergewise serve`'s decoding: prompts of different lengths batched under a route decode as each alone",
}

KINDS = {
    "dense": ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox"),
    "mixture of experts": ("mixtral", "qwen2_moe", "qwen3_moe"),
    "vision-language": ("gemma3", "llava", "qwen2_vl"),
}

# Where a feature does not apply, the one error it gives instead (a fragment of it).
REFUSALS: dict[tuple[str, str], str] = {
    (arch, "slices"): "is a multimodal model" for arch in ("gemma3", "llava", "qwen2_vl")
}


def outcome(arch: str, feature: str) -> str:
    return REFUSALS.get((arch, feature), WORKS)


def render() -> str:
    lines = [
        "# Architectures",
        "",
        "What each command does with each model family, as `tests/test_architectures.py` checks it on tiny",
        "random checkpoints that transformers builds and saves. Generated from the matrix those tests run",
        "(`tests/support/architectures.py`); a test keeps this page equal to it.",
        "",
        *(f"- **{feature}**: {text}." for feature, text in FEATURES.items()),
        "",
        "| family | kind | " + " | ".join(FEATURES) + " |",
        "|---|---|" + "---|" * len(FEATURES),
    ]
    for kind, archs in KINDS.items():
        for arch in archs:
            cells = [outcome(arch, feature) for feature in FEATURES]
            shown = [cell if cell == WORKS else f"one error: *{cell}*" for cell in cells]
            lines.append(f"| {arch} | {kind} | " + " | ".join(shown) + " |")
    lines += [
        "",
        "Mixture-of-experts checkpoints store one matrix per expert; transformers fuses a layer's experts",
        "into 3-D tensors. The layer-by-layer passes read them through transformers' own conversion rules,",
        "AIM measures each expert's inputs (the tokens routed to it) and relaxes each expert's matrices,",
        "and Mediator routes each stored expert matrix in place inside the fused tensor. Text reaches only",
        "a vision-language model's language model: only its tensors get statistics and are routed; the",
        "vision tower and projector are merged by the recipe's method.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
