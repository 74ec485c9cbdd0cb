"""OpenAI-compatible HTTP endpoints over the serving core (FastAPI).

The handlers only validate, submit to `ServingCore` and turn its events into responses: one JSON
object, or server-sent events in OpenAI's chunk format ending with `[DONE]`. A Mediator request's
route comes back in `x-mergewise-*` headers and under a `mergewise` key of the final object or chunk.
Every refusal is an OpenAI error object (`{"error": {message, type, param, code}}`) with its status;
no traceback leaves the server.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from mergewise.mediator.router import Route
from mergewise.serving.core import Event, ServeRequest, ServingCore, ServingError, Ticket
from mergewise.serving.decoding import Sampling

MAX_BODY_BYTES = 1 << 20
MAX_STOP_SEQUENCES = 4
DISCONNECT_POLL_SECONDS = 0.25


class SamplingFields(BaseModel):
    """The generation parameters both endpoints take (others OpenAI defines are refused if set to
    anything but their neutral value)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is served")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES or any(not stop for stop in stops):
            raise ValueError(f"stop: up to {MAX_STOP_SEQUENCES} non-empty strings")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value not in (None, False):
            raise ValueError("logprobs are not served")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not served (only 0)")
        return value

    def sampling(self, default_max_tokens: int) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(stops),
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not served")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def create_app(
    core: ServingCore, *, api_key: str | None = None, default_max_tokens: int = 16, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The ASGI app serving `core` (started and closed with the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        core.start()
        try:
            yield
        finally:
            await asyncio.to_thread(core.close)

    app = FastAPI(title="mergewise", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where: str | None = ".".join(str(part) for part in first["loc"] if part != "body")
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "json_invalid":
            message, where = "the body is not valid JSON", None
        return _error(ServingError(400, f"{where}: {message}" if where else message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return _error(ServingError(error.status_code, str(error.detail), kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return _error(ServingError(500, f"internal error: {type(error).__name__}", "server_error"))

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(
                    ServingError(
                        401,
                        "a valid API key is needed (Authorization: Bearer …)",
                        "authentication_error",
                        "invalid_api_key",
                    )
                )
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(core.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": created, "owned_by": "mergewise"}
                    for name in core.model_names
                ],
            }
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ids = _prompt_ids(core, body.prompt)
        served = ServeRequest(ids, body.sampling(default_max_tokens), body.model, route_ids=ids)
        return await _respond(core, served, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if core.tokenizer.chat_template is None:
            raise ServingError(
                400, f"model {body.model!r} has no chat template; use /v1/completions", code="no_chat_template"
            )
        messages = [{"role": message.role, "content": message.text} for message in body.messages]
        try:
            encoded = core.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            # transformers types the result as every form it may take; tokenized, it is a mapping
            ids = list(encoded["input_ids"])  # type: ignore[call-overload,index]
        except Exception as error:  # the template refused these messages (it may raise on purpose)
            raise ServingError(
                400, f"messages: the chat template cannot render them ({error})", param="messages"
            ) from None
        users = [message.text for message in body.messages if message.role == "user"]
        route_ids = _encode(core, users[-1]) if users else ids
        sampling = body.sampling(default_max_tokens)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            sampling = Sampling(
                body.max_completion_tokens, sampling.temperature, sampling.top_p, sampling.seed, sampling.stop
            )
        served = ServeRequest(ids, sampling, body.model, route_ids=route_ids)
        return await _respond(core, served, body, request, chat=True)

    @app.exception_handler(ServingError)
    async def refused(request: Request, error: ServingError) -> JSONResponse:
        return _error(error)

    return app


def _prompt_ids(core: ServingCore, prompt: str | list[str] | list[int]) -> list[int]:
    """The ids of a completion's prompt: given as ids, or text (alone or in a list of one)."""
    if isinstance(prompt, str):
        return _encode(core, prompt)
    if prompt and isinstance(prompt[0], str):
        return _encode(core, prompt[0])
    return cast(list[int], list(prompt))  # a list holding text was taken above


def _encode(core: ServingCore, text: str) -> list[int]:
    from mergewise.mediator.runtime import encode_prompts

    return encode_prompts(core.tokenizer, [text])[0]


async def _respond(core: ServingCore, served: ServeRequest, body: SamplingFields, request: Request, *, chat: bool):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    ticket = core.submit(served, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    identifier = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    started = int(time.time())
    try:
        first = await _next_event(events, request, ticket)
    except BaseException:
        ticket.cancel()
        raise
    if first.error is not None:
        return _error(first.error)
    headers = _route_headers(ticket.route)
    shape = _Shape(identifier, started, body.model, chat, ticket.route)
    if body.stream:
        return StreamingResponse(
            _stream(events, request, ticket, shape, body.include_usage), media_type="text/event-stream", headers=headers
        )
    text = []
    try:
        while True:
            event = await _next_event(events, request, ticket)
            if event.kind == "text":
                text.append(event.text)
            elif event.error is not None:
                return _error(event.error)
            else:
                return JSONResponse(shape.whole("".join(text), event), headers=headers)
    except BaseException:
        ticket.cancel()
        raise


async def _next_event(events: asyncio.Queue, request: Request, ticket: Ticket) -> Event:
    """The ticket's next event; a client that went away cancels it (and this raises)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
        except TimeoutError:
            if await request.is_disconnected():
                ticket.cancel()
                raise asyncio.CancelledError from None


async def _stream(
    events: asyncio.Queue, request: Request, ticket: Ticket, shape: _Shape, include_usage: bool
) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield _sse(shape.chunk({"role": "assistant", "content": ""}))
        while True:
            event = await _next_event(events, request, ticket)
            if event.kind == "text":
                yield _sse(shape.chunk({"content": event.text} if shape.chat else event.text))
            elif event.error is not None:
                yield _sse({"error": _error_body(event.error)})
                break
            else:
                yield _sse(shape.last_chunk(event, include_usage))
                break
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # a no-op once the request ended; frees its slot when the client left


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Shape:
    """One request's response objects, as OpenAI shapes them for its endpoint."""

    def __init__(self, identifier: str, created: int, model: str, chat: bool, route: Route | None):
        self.identifier, self.created, self.model, self.chat, self.route = identifier, created, model, chat, route

    def _object(self, choices: list[dict], *, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.identifier, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, delta, finish_reason: str | None = None) -> dict:
        choice = (
            {"index": 0, "delta": delta, "finish_reason": finish_reason}
            if self.chat
            else {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        )
        return self._object([choice], chunk=True)

    def last_chunk(self, event: Event, include_usage: bool) -> dict:
        payload = self.chunk({} if self.chat else "", _finish_reason(event))
        if include_usage:
            payload["usage"] = _usage(event)
        return self._with_route(payload)

    def whole(self, text: str, event: Event) -> dict:
        choice = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": _finish_reason(event),
                "logprobs": None,
            }
            if self.chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(event)}
        )
        return self._with_route({**self._object([choice], chunk=False), "usage": _usage(event)})

    def _with_route(self, payload: dict) -> dict:
        if self.route is not None:
            payload["mergewise"] = {"route": self.route.to_json()}
        return payload


def _finish_reason(event: Event) -> str:
    return event.finish_reason if event.finish_reason in ("stop", "length") else "stop"


def _usage(event: Event) -> dict:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def _route_headers(route: Route | None) -> dict[str, str]:
    if route is None:
        return {}
    return {
        "x-mergewise-route": route.decision,
        "x-mergewise-task": route.task or "",
        "x-mergewise-uncertainty": f"{route.uncertainty:.4f}",
    }


def _error_body(error: ServingError) -> dict:
    return {"message": str(error), "type": error.kind, "param": error.param, "code": error.code}


def _error(error: ServingError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse({"error": _error_body(error)}, status_code=error.status, headers=headers)


class _BodyLimit:
    """Refuse request bodies over `max_bytes` (413) before they are read whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(self._too_large())(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, self._too_large().args[0])
            return message

        return await self.app(scope, limited, send)

    def _too_large(self) -> ServingError:
        return ServingError(413, f"the request body is over {self.max_bytes} bytes")
