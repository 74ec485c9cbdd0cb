"""`mergewise serve` as users run it: a live server on 127.0.0.1 in its own process, spoken to by the
official `openai` client (and plain HTTP where the client hides what is tested)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP library of openai 3

from mergewise.mediator.runtime import load  # noqa: E402
from tests.support.decoding import reference_text  # noqa: E402
from tests.support.tiny_mediator import (  # noqa: E402
    HELD_BACK_WORDS,
    TASK_WORDS,
    prompts_for,
)

pytestmark = pytest.mark.integration  # a live server process and the openai client

STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`mergewise serve FOLDER` on a free loopback port, in a process of its own."""

    def __init__(self, folder: Path, *flags: str):
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mergewise.cli",
                "serve",
                str(folder),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server ended: {self.process.communicate()[1][-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **options)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.exited()

    def exited(self) -> tuple[int, str]:
        """The status and stderr once the server ends by itself (at most a minute)."""
        _, err = self.process.communicate(timeout=60)
        return self.process.returncode, err


@pytest.fixture(scope="module")
def server(mediator_dir):
    running = Server(mediator_dir, "--max-batch", "8")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(mediator_dir):
    """The folder as `mergewise generate` loads it."""
    return load(mediator_dir)


def test_models_list_every_route(server):
    names = [model.id for model in server.client().models.list().data]
    assert names == ["tiny-mediator", "auto", "dense", *TASK_WORDS]


def test_completion_chat_and_stream_through_the_openai_client(server):
    client = server.client()
    prompt = prompts_for(TASK_WORDS["numbers"], 1, 3)[0]
    completion = client.completions.create(model="auto", prompt=prompt, max_tokens=6, temperature=0)
    assert completion.object == "text_completion" and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6 and completion.usage.prompt_tokens > 0
    streamed = client.completions.create(model="auto", prompt=prompt, max_tokens=6, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(chunk.choices[0].text for chunk in chunks) == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason
    chat = client.chat.completions.create(
        model="numbers", messages=[{"role": "user", "content": prompt}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    chat_chunks = list(
        client.chat.completions.create(
            model="numbers",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chat_chunks if chunk.choices) == (
        chat.choices[0].message.content
    )
    assert chat_chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_routes_come_back_in_headers_and_body(server, reference):
    client = server.client()
    for task, words in TASK_WORDS.items():
        prompt = prompts_for(words, 1, 40)[0]
        raw = client.completions.with_raw_response.create(model=task, prompt=prompt, max_tokens=2, temperature=0)
        assert raw.headers["x-mergewise-route"] == "select" and raw.headers["x-mergewise-task"] == task
        assert raw.parse().model_extra["mergewise"]["route"]["task"] == task
        automatic = client.completions.with_raw_response.create(
            model="auto", prompt=prompt, max_tokens=2, temperature=0
        )
        [route] = reference.route_texts([prompt])
        assert automatic.headers["x-mergewise-route"] == route.decision
        assert automatic.headers["x-mergewise-task"] == (route.task or "")
        assert float(automatic.headers["x-mergewise-uncertainty"]) == pytest.approx(route.uncertainty, abs=1e-4)
        body = automatic.parse().model_extra["mergewise"]["route"]
        assert body == json.loads(json.dumps(route.to_json()))
    dense = client.completions.with_raw_response.create(model="dense", prompt="one two", max_tokens=2)
    assert dense.headers["x-mergewise-route"] == "dense"


def test_errors_are_openai_error_objects(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-9", prompt="one", max_tokens=2)
    assert unknown.value.body["code"] == "model_not_found"
    for bad in ({"temperature": 5}, {"n": 3}, {"max_tokens": 0}, {"top_p": 0}, {"logprobs": 2}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="auto", prompt="one", **{"max_tokens": 2, **bad})
        assert refused.value.body["type"] == "invalid_request_error" and refused.value.body["param"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="auto", prompt="one " * 200, max_tokens=2)
    broken = httpx.post(
        f"{server.url}/v1/completions", content=b"{not json", timeout=10, headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    too_big = httpx.post(
        f"{server.url}/v1/completions",
        content=b"x" * (2 << 20),
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert too_big.status_code == 413 and "error" in too_big.json()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def mixed_prompts(count: int) -> list[tuple[str, str]]:
    """(model, prompt) pairs over every route and task, and prompts of no task."""
    names = ["auto", "dense", *TASK_WORDS]
    groups = [*TASK_WORDS.values(), HELD_BACK_WORDS]
    return [
        (names[index % len(names)], prompts_for(groups[index % len(groups)], 1, 500 + index)[0])
        for index in range(count)
    ]


def expected_text(reference, model: str, prompt: str, max_tokens: int) -> str:
    """`mergewise generate`'s answer (auto), or the same greedy generation with the route forced."""
    if model == "auto":
        [(text, _)] = reference.generate_text([prompt], max_new_tokens=max_tokens)
        return text
    ids = reference.encode([prompt])[0]
    return reference_text(reference, ids, {} if model == "dense" else {model: 1.0}, max_tokens)


def test_greedy_answers_equal_generate_alone_and_under_32_concurrent_clients(server, reference):
    pairs = mixed_prompts(32)
    expected = [expected_text(reference, model, prompt, 8) for model, prompt in pairs]
    client = server.client()
    alone = [
        client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        for model, prompt in pairs
    ]
    assert alone == expected

    async def concurrently():
        async with server.async_client() as concurrent:
            answers = await asyncio.gather(
                *(
                    concurrent.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
                    for model, prompt in pairs
                )
            )
        return [answer.choices[0].text for answer in answers]

    assert asyncio.run(concurrently()) == expected
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "mergewise_route_switches_total" in metrics and "mergewise_time_to_first_token_seconds_bucket" in metrics


def test_a_full_queue_answers_429_and_a_leaving_client_frees_its_slot(mediator_dir):
    server = Server(mediator_dir, "--max-batch", "1", "--max-queue", "1")
    try:

        async def flood():
            async with server.async_client() as client:
                return await asyncio.gather(
                    *(
                        client.completions.create(model="dense", prompt="one two three", max_tokens=60, temperature=0)
                        for _ in range(8)
                    ),
                    return_exceptions=True,
                )

        outcomes = asyncio.run(flood())
        refused = [outcome for outcome in outcomes if isinstance(outcome, openai.RateLimitError)]
        assert refused and all(outcome.response.headers["retry-after"] for outcome in refused)
        assert all(isinstance(outcome, openai.RateLimitError) or outcome.choices for outcome in outcomes)

        # A streaming client that leaves after its first chunk: its generation stops and its slot frees.
        with httpx.stream(
            "POST",
            f"{server.url}/v1/completions",
            timeout=30,
            json={"model": "dense", "prompt": "one two", "max_tokens": 100, "temperature": 0, "stream": True},
        ) as stream:
            next(stream.iter_lines())
        deadline = time.monotonic() + 30
        while 'status="cancelled"' not in (metrics := httpx.get(f"{server.url}/metrics", timeout=10).text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.2)
        after = server.client().completions.create(model="dense", prompt="one", max_tokens=2)
        assert after.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()


def test_sigterm_finishes_the_streams_in_flight_refuses_new_ones_and_exits_0(mediator_dir):
    server = Server(mediator_dir, "--max-batch", "1")

    async def streams():
        async with server.async_client() as client:

            async def one(index: int) -> tuple[str, str | None]:
                stream = await client.completions.create(
                    model="dense", prompt=f"one two {index}", max_tokens=40, temperature=0, stream=True
                )
                text, reason = "", None
                async for chunk in stream:
                    if index == 0 and not text:
                        os.kill(server.process.pid, signal.SIGTERM)
                    text += chunk.choices[0].text
                    reason = chunk.choices[0].finish_reason or reason
                return text, reason

            first = asyncio.create_task(one(0))
            others = [asyncio.create_task(one(index)) for index in (1, 2)]
            await asyncio.sleep(0)
            return await asyncio.gather(first, *others)

    finished = asyncio.run(streams())
    assert all(reason in ("stop", "length") for _, reason in finished)
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{server.url}/v1/completions", json={"model": "dense", "prompt": "one"}, timeout=5)
    status, err = server.exited()  # the one SIGTERM ends it (a second one may cut its exit short)
    assert status == 0, err
    assert "Traceback" not in err


def test_an_api_key_guards_v1_and_binding_beyond_loopback_needs_one(mediator_dir, capsys):
    from mergewise.cli import main

    assert main(["serve", str(mediator_dir), "--host", "0.0.0.0"]) == 2
    assert "needs --api-key" in capsys.readouterr().err
    server = Server(mediator_dir, "--api-key", "s3cret", "--dtype", "bfloat16")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert [model.id for model in client.models.list().data][:2] == ["tiny-mediator", "auto"]
        answer = client.completions.create(model="numbers", prompt="one two three", max_tokens=3)  # weights in bf16
        assert answer.usage.completion_tokens <= 3
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # probes need no key
    finally:
        server.stop()
