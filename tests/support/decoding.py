"""Decoding as `mergewise serve`'s worker runs a batch, for tests that compare it with `generate`."""

from __future__ import annotations

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
