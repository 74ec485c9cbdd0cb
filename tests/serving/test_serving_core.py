"""The serving core and its HTTP app in this process: decoding, scheduling by route, the weights after
many requests, and the app's answers (through the official `openai` client on an in-process transport)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP library of openai 3

from mergewise.mediator.runtime import load  # noqa: E402
from mergewise.serving.core import ServeRequest, ServingCore, ServingError  # noqa: E402
from mergewise.serving.decoding import Completion, DecodingBatch, Sampling  # noqa: E402
from mergewise.serving.http import create_app  # noqa: E402
from tests.support.decoding import decode_all, reference_text  # noqa: E402
from tests.support.tiny_mediator import (  # noqa: E402
    HELD_BACK_WORDS,
    TASK_WORDS,
    prompts_for,
)
from tests.support.tiny_models import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def model(mediator_dir):
    return load(mediator_dir)


def test_batched_greedy_decoding_equals_generate_one_prompt_at_a_time(model):
    prompts = [prompts_for(words, 3, 20 + index) for index, words in enumerate(TASK_WORDS.values())]
    encoded = model.encode([prompt for group in prompts for prompt in group])
    model.use_weights({})
    completions = [
        Completion(
            ids, Sampling(max_tokens=7, temperature=0), model.tokenizer, frozenset([model.tokenizer.eos_token_id])
        )
        for ids in encoded
    ]
    streamed = [""] * len(completions)

    def collect(completion, text):
        streamed[completions.index(completion)] += text

    decode_all(model, completions, collect)
    for row, ids in enumerate(encoded):
        expected = reference_text(model, ids, {}, 7)
        assert completions[row].text == streamed[row] == expected
        assert completions[row].finish_reason in ("stop", "length")


def test_sequences_joining_a_running_batch_decode_as_they_would_alone(model):
    """Rows join between steps with prompts longer and shorter than the batch's, leave as they end,
    and every one gives what greedy `generate` gives it alone; padding nobody attends to is dropped."""
    model.use_weights({})
    prompts = model.encode(
        [prompts_for(words, 1, 40 + index)[0] * (1 + index % 3) for index, words in enumerate(TASK_WORDS.values())]
    )
    lengths = [3, 9, 5, 12]
    completions = [
        Completion(ids, Sampling(max_tokens=length, temperature=0), model.tokenizer, frozenset())
        for ids, length in zip(prompts, lengths)
    ]
    batch = DecodingBatch(model.model, model.tokenizer.pad_token_id, model.device)
    batch.join(completions[:2])
    for newcomer in completions[2:]:
        for _ in range(2):
            batch.step()
            batch.drop_ended()
        assert batch.takes_newcomers
        batch.join([newcomer])
    while len(batch):
        batch.step()
        batch.drop_ended()
        if len(batch):
            assert batch.attention_mask[:, 0].any()  # no column only padding
            assert batch.cache.get_seq_length() == batch.attention_mask.shape[1]
    for completion, ids, length in zip(completions, prompts, lengths):
        assert completion.text == reference_text(model, ids, {}, length)
        assert completion.finish_reason == "length" and len(completion.tokens) == length


def test_a_sliding_window_cache_takes_no_newcomers(model):
    """A sliding window's cache keeps each row's last tokens in place: rows cannot be appended to it."""
    config = tiny_config("mistral", vocab_size=len(model.tokenizer))
    config.sliding_window = 4
    sliding = AutoModelForCausalLM.from_config(config).eval()
    batch = DecodingBatch(sliding, model.tokenizer.pad_token_id, torch.device("cpu"))
    assert batch.takes_newcomers  # an empty batch takes its first rows
    ids = model.encode(["one two three"])[0]
    batch.join([Completion(ids, Sampling(max_tokens=3, temperature=0), model.tokenizer, frozenset())])
    assert not batch.takes_newcomers


def timed_events(core, request, name, log):
    """Submit `request`, logging (name, event kind) as events arrive, in arrival order."""
    return core.submit(request, lambda event: log.append((name, event.kind)))


def wait_for_first_token(ticket) -> None:
    deadline = time.monotonic() + 60
    while ticket.first_token is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ticket.first_token is not None


def test_a_request_for_the_route_in_place_joins_the_running_batch(model):
    core = ServingCore(model, served_name="tiny", max_batch=4, max_wait=60)
    core.end_ids = frozenset()  # no early end: the first request runs all its tokens
    ids = model.encode(["nine ten one"])[0]
    log = []
    with core:
        first = timed_events(core, ServeRequest(ids, Sampling(max_tokens=60, temperature=0), "dense"), "first", log)
        wait_for_first_token(first)
        timed_events(core, ServeRequest(ids, Sampling(max_tokens=2, temperature=0), "dense"), "joined", log)
    assert [name for name, kind in log if kind == "done"] == ["joined", "first"]
    assert core.metrics.route_switches._value.get() == 0  # D was in place throughout


def test_once_another_route_waited_past_max_wait_the_running_batch_takes_no_one(model):
    """The batch runs out and the waiting route goes next, though a later request for the route in
    place came meanwhile: switches stay bounded and no route waits forever."""
    core = ServingCore(model, served_name="tiny", max_batch=4, max_wait=0.0)
    core.end_ids = frozenset()
    ids = model.encode(["nine ten one"])[0]
    task = model.router.tasks[0]
    log = []
    with core:
        first = timed_events(core, ServeRequest(ids, Sampling(max_tokens=40, temperature=0), "dense"), "first", log)
        wait_for_first_token(first)
        timed_events(core, ServeRequest(ids, Sampling(max_tokens=2, temperature=0), task), "other route", log)
        timed_events(core, ServeRequest(ids, Sampling(max_tokens=2, temperature=0), "dense"), "late", log)
    assert [name for name, kind in log if kind == "done"] == ["first", "other route", "late"]
    assert core.metrics.route_switches._value.get() == 2


def test_stop_strings_are_cut_and_never_streamed(model):
    ids = model.encode(["one two three four"])[0]
    model.use_weights({})
    whole = Completion(ids, Sampling(max_tokens=12, temperature=0), model.tokenizer, frozenset())
    decode_all(model, [whole])
    stop = whole.text[len(whole.text) // 2 :][:3]
    assert stop.strip()
    streamed = []
    cut = Completion(ids, Sampling(max_tokens=12, temperature=0, stop=(stop,)), model.tokenizer, frozenset())
    decode_all(model, [cut], lambda completion, text: streamed.append(text))
    assert cut.finish_reason == "stop" and cut.text == whole.text[: whole.text.find(stop)]
    assert "".join(streamed) == cut.text


def test_seeded_sampling_repeats_and_nucleus_of_one_token_is_greedy(model):
    ids = model.encode(["quick brown fox"])[0]
    model.use_weights({})

    def run(sampling):
        completion = Completion(ids, sampling, model.tokenizer, frozenset())
        decode_all(model, [completion])
        return completion.tokens

    assert run(Sampling(10, temperature=1.3, seed=5)) == run(Sampling(10, temperature=1.3, seed=5))
    assert run(Sampling(10, temperature=1.0, top_p=1e-6, seed=1)) == run(Sampling(10, temperature=0))


def mixed_requests(model, count: int, seed: int) -> list[ServeRequest]:
    rng = random.Random(seed)
    names = ["auto", "dense", *TASK_WORDS]
    requests = []
    for index in range(count):
        words = rng.choice([*TASK_WORDS.values(), HELD_BACK_WORDS])
        ids = model.encode(prompts_for(words, 1, 1000 * seed + index))[0]
        requests.append(ServeRequest(ids, Sampling(max_tokens=rng.randint(1, 4), temperature=0), rng.choice(names)))
    return requests


def test_requests_are_batched_by_route_and_switches_stay_few(model):
    """48 requests of mixed routes, all queued before the worker starts: one batch per route key (of
    at most 8), so the weights change once per route, not once per request."""
    core = ServingCore(model, served_name="tiny", max_batch=8, max_wait=60)
    tickets = [core.submit(request) for request in mixed_requests(model, 48, 1)]
    with core:
        outcomes = [list(ticket.events(timeout=60)) for ticket in tickets]
    assert all(events[0].kind == "route" and events[-1].kind == "done" for events in outcomes)
    keys = {(ticket.route.decision, tuple(sorted(ticket.route.weights().items()))) for ticket in tickets}
    switches = core.metrics.route_switches._value.get()
    assert switches <= len(keys)
    assert core.metrics.requests.labels("select", "ok")._value.get() > 0


def test_after_200_mixed_requests_through_the_app_the_dense_weights_are_the_folders(model, mediator_dir):
    core = ServingCore(model, served_name="tiny", max_batch=4, max_wait=0.05).start()
    app = create_app(core)
    requests = mixed_requests(model, 200, 2)

    async def run_all():
        transport = httpx.ASGITransport(app=app)
        client = openai.AsyncOpenAI(
            base_url="http://serving.test/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=transport, base_url="http://serving.test"),
        )
        limit = asyncio.Semaphore(16)

        async def one(request):
            async with limit:
                return await client.completions.create(
                    model=request.model,
                    prompt=request.prompt_ids,
                    max_tokens=request.sampling.max_tokens,
                    temperature=0,
                )

        return await asyncio.gather(*(one(request) for request in requests))

    try:
        answers = asyncio.run(run_all())
    finally:
        core.close()
    assert len(answers) == 200 and all(answer.choices[0].finish_reason in ("stop", "length") for answer in answers)
    assert core.metrics.route_switches._value.get() > 1
    model.use_weights({})
    stored = load_file(mediator_dir / "model.safetensors")
    for name in model.experts.tensors:
        assert torch.equal(dict(model.model.named_parameters())[name].detach(), stored[name]), name


def test_refusals_are_named(model):
    core = ServingCore(model, served_name="tiny", max_queue=2)
    ids = model.encode(["one two"])[0]
    with pytest.raises(ServingError, match="model 'nope' does not exist") as unknown:
        core.submit(ServeRequest(ids, Sampling(), "nope"))
    assert unknown.value.status == 404
    with pytest.raises(ServingError, match="exceed the model's context") as long:
        core.submit(ServeRequest(ids, Sampling(max_tokens=10_000), "auto"))
    assert long.value.status == 400
    with pytest.raises(ServingError, match="outside the vocabulary"):
        core.submit(ServeRequest([10**6], Sampling(), "auto"))
    core.submit(ServeRequest(ids, Sampling(), "auto"))
    core.submit(ServeRequest(ids, Sampling(), "auto"))
    with pytest.raises(ServingError, match="queue is full") as full:
        core.submit(ServeRequest(ids, Sampling(), "auto"))
    assert full.value.status == 429
    core.close()  # finishes the two admitted requests
    with pytest.raises(ServingError, match="shutting down"):
        core.submit(ServeRequest(ids, Sampling(), "auto"))


def test_a_cancelled_request_leaves_its_slot_and_its_batch_goes_on(model):
    core = ServingCore(model, served_name="tiny", max_batch=2)
    ids = model.encode(["nine ten one"])[0]
    first = core.submit(ServeRequest(ids, Sampling(max_tokens=40, temperature=0), "dense"))
    second = core.submit(ServeRequest(ids, Sampling(max_tokens=40, temperature=0), "dense"))
    gone = threading.Event()

    def cancel_on_first_text(event):
        if event.kind == "text" and not gone.is_set():
            gone.set()
            second.cancel()
        second._events.put(event)

    second.deliver = cancel_on_first_text
    with core:
        whole = [event for event in first.events(timeout=60)]
        cut = [event for event in second.events(timeout=60)]
    assert whole[-1].finish_reason in ("stop", "length")
    assert cut[-1].kind == "done" and cut[-1].finish_reason == "cancelled"
    assert cut[-1].completion_tokens < whole[-1].completion_tokens or whole[-1].completion_tokens <= 1


def test_a_caller_that_cannot_take_events_is_dropped_and_the_worker_goes_on(model):
    def closed_loop(event):
        raise RuntimeError("Event loop is closed")

    ids = model.encode(["five six seven"])[0]
    with ServingCore(model, served_name="tiny") as core:
        gone = core.submit(ServeRequest(ids, Sampling(max_tokens=5, temperature=0), "dense"), closed_loop)
        after = core.submit(ServeRequest(ids, Sampling(max_tokens=5, temperature=0), "dense"))
        events = list(after.events(timeout=60))
    assert gone.cancelled and events[-1].kind == "done"
