"""An lm-eval-harness model type, `mergewise`, scoring any model folder `load_model` accepts.

    import mergewise.evaluate.lm_eval_adapter  # registers the model type
    lm_eval.simple_evaluate(model="mergewise", model_args="pretrained=DIR,device=cpu", tasks=[...])

or from a shell: `python -m mergewise.evaluate.lm_eval_adapter --model mergewise --model_args
pretrained=DIR --tasks …` (lm_eval's own command line, with the model type registered first).
A folder's own Python (`auto_map`) runs only with `trust_remote_code=True` in the model arguments
(which lm_eval's `--trust_remote_code` adds)."""

from __future__ import annotations

from itertools import groupby

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mergewise.checkpoint.tokens import start_token_id
from mergewise.evaluate.loading import load_model
from mergewise.evaluate.scoring import continuation_log_likelihoods, greedy_completions, score_encoded

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GENERATED_TOKENS = 256


@register_model("mergewise")
class MergewiseLM(LM):
    """lm-eval's three request types over mergewise's loader and batched scorers."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        **_ignored,
    ):
        super().__init__()
        self.loaded = load_model(pretrained, device or "cpu", trust_remote_code=trust_remote_code)
        # lm-eval may pass "auto"; a fixed size is predictable on CPU and small models.
        given = str(batch_size)
        self.batch_size = int(given) if given.isdigit() else DEFAULT_BATCH_SIZE
        self.max_length = int(max_length or self.loaded.model.config.max_position_embeddings)

    @property
    def device(self):
        return self.loaded.device

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [request.args for request in requests]
        scores = continuation_log_likelihoods(self.loaded, pairs, self.batch_size, self.max_length)
        results = [(log_likelihood, greedy) for log_likelihood, greedy, _ in scores]
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each document in windows of the model's length, every token predicted exactly once."""
        results = []
        for request in requests:
            (text,) = request.args
            token_ids = self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
            start_id = start_token_id(self.loaded.tokenizer)
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(token_ids, start_id, self.max_length, 1)
            ]
            total = 0.0
            for start in range(0, len(windows), self.batch_size):
                total += sum(score[0] for score in score_encoded(self.loaded, windows[start : start + self.batch_size]))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests) -> list[str]:
        """Greedy generation; requests sharing generation settings are batched together."""
        results: dict[int, str] = {}
        indexed = sorted(enumerate(requests), key=lambda item: repr(sorted(item[1].args[1].items())))
        for _, grouped in groupby(indexed, key=lambda item: repr(sorted(item[1].args[1].items()))):
            group = list(grouped)
            settings = group[0][1].args[1]
            until = settings.get("until") or []
            stop = [until] if isinstance(until, str) else list(until)
            stop.append(self.loaded.tokenizer.eos_token)
            completions = greedy_completions(
                self.loaded,
                [request.args[0] for _, request in group],
                int(settings.get("max_gen_toks", DEFAULT_MAX_GENERATED_TOKENS)),
                self.batch_size,
                stop=stop,
                max_length=self.max_length,
            )
            for (index, request), completion in zip(group, completions):
                results[index] = completion
                self.cache_hook.add_partial("generate_until", request.args, completion)
        return [results[index] for index in range(len(requests))]


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
