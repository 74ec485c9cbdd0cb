"""Decoding as `mergewise serve`'s worker runs a batch, for tests that compare it with `generate`."""

from __future__ import annotations

import torch

from mergewise.serving.decoding import DecodingBatch


def decode_all(model, completions, on_text=None) -> None:
    """Every completion decoded to its end in one batch, as the server's worker runs a batch."""
    batch = DecodingBatch(model.model, model.tokenizer.pad_token_id, model.device)
    released = batch.join(completions)
    while True:
        for row, text in released:
            if on_text is not None:
                on_text(batch.completions[row], text)
        batch.drop_ended()
        if not len(batch):
            return
        released = batch.step()


def reference_text(model, prompt_ids: list[int], mix: dict[str, float], max_tokens: int) -> str:
    """What transformers' greedy `generate` makes of one prompt alone with the given weights in place."""
    model.use_weights(mix)
    generated = model.model.generate(
        input_ids=torch.tensor([prompt_ids]),
        do_sample=False,
        max_new_tokens=max_tokens,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    return model.tokenizer.decode(generated[0, len(prompt_ids) :], skip_special_tokens=True)
