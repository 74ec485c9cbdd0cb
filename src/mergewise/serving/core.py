"""The serving core: requests in, routed and batched generation out, no HTTP inside.

One worker thread runs every forward pass. A request is routed when it is admitted (`model` "auto":
one prefill through the dense model D, batched with the other new requests; a task name or "dense"
skips the router) and then waits in the queue of its route. A batch decodes up to `max_batch`
requests of the route whose weights are in place (`decoding.DecodingBatch`); requests of that route
join it between steps as rows free up, until another route's oldest request has waited longer than
`max_wait`: then the batch takes no one more, and when its last sequence ends the worker switches to
the route holding the oldest request. Route switches are the runtime's in-place writes: every
weight is held once, whatever the concurrency, and D comes back bit for bit.

A `Ticket` is a request's handle: its route once decided, the text as it is released, its end. Events
reach the caller through `deliver` (any callable; the HTTP layer hands them to its event loop) or,
by default, a queue that `Ticket.events()` reads.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from mergewise.mediator.router import Route
from mergewise.mediator.runtime import RoutedModel
from mergewise.serving.decoding import Completion, DecodingBatch, Sampling
from mergewise.serving.metrics import ServingMetrics

AUTO, DENSE = "auto", "dense"


class ServingError(Exception):
    """A request the server answers with an error: its HTTP status and OpenAI's error type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


@dataclass(frozen=True)
class Event:
    """What a ticket reports: "route" (once, first), "text" (released text), "done" (the end:
    finish reason and token counts) or "error" (`error`)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ServingError | None = None


@dataclass
class ServeRequest:
    """A request as the core takes it: `prompt_ids` to complete; `route_ids` the tokens the router
    reads (the prompt, or a chat's user text); `model` one of `ServingCore.model_names`."""

    prompt_ids: list[int]
    sampling: Sampling
    model: str = AUTO
    route_ids: list[int] | None = None


@dataclass(eq=False)
class Ticket:
    request: ServeRequest
    deliver: Callable[[Event], object] | None = None  # what it returns is ignored
    number: int = 0
    route: Route | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.deliver is None:
            self.deliver = self._events.put

    def cancel(self) -> None:
        """The client is gone: drop the request, or end its sequence at the next step."""
        self._cancelled.set()

    def send(self, event: Event) -> None:
        """Hand an event to the caller; a caller that can no longer take it (its event loop closed)
        has gone, so the request is cancelled rather than the worker failing."""
        assert self.deliver is not None  # __post_init__ defaults it
        try:
            self.deliver(event)
        except Exception:
            self.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The ticket's events until its end (with the default `deliver`)."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.kind in ("done", "error"):
                return


class ServingCore:
    """Routes, queues, batches and decodes requests for one loaded model folder."""

    def __init__(
        self,
        model: RoutedModel,
        *,
        served_name: str,
        max_batch: int = 8,
        max_queue: int = 64,
        max_wait: float = 2.0,
        max_prompt_tokens: int | None = None,
        metrics: ServingMetrics | None = None,
    ):
        self.model = model
        self.served_name = served_name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.context = int(getattr(model.model.config, "max_position_embeddings", 0) or 0) or None
        self.max_prompt_tokens = max_prompt_tokens or self.context
        self.metrics = metrics or ServingMetrics()
        self.tokenizer = model.tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.end_ids = frozenset(_end_ids(model))
        self._admitted: deque[Ticket] = deque()  # not routed yet
        self._queues: dict[tuple, deque[Ticket]] = {}  # by route key, in arrival order
        self._in_place: tuple | None = _route_key(self._forced_route(DENSE))  # what the model holds: D
        self._waiting = 0
        self._batch: DecodingBatch | None = None  # the sequences decoding now, with the route in place
        self._running: list[Ticket] = []  # their requests, row for row
        self._numbers = itertools.count(1)
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="mergewise-serve", daemon=True)

    # ------------------------------------------------------------------------------ outside
    @property
    def model_names(self) -> list[str]:
        """What `model` may say: the served name and "auto" route; "dense" and each task force a route."""
        if self.model.router is None:  # not a mediator
            return [self.served_name]
        return [self.served_name, AUTO, DENSE, *self.model.router.tasks]

    def start(self) -> ServingCore:
        """Start the worker (once; a closed core stays closed)."""
        with self._lock:
            if not self._worker.is_alive() and not self._stopping:
                self._worker.start()
        return self

    def close(self) -> None:
        """Stop admitting; finish every admitted request; stop the worker."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._lock.notify_all()
        if self._worker.is_alive():
            self._worker.join()

    def stop_admitting(self) -> None:
        with self._lock:
            self._accepting = False

    def __enter__(self) -> ServingCore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, request: ServeRequest, deliver: Callable[[Event], object] | None = None) -> Ticket:
        """Admit a request (checked first: its model, prompt and length); raises ServingError (404
        unknown model, 400 too long, 429 queue full, 503 closing)."""
        self.check(request)
        ticket = Ticket(request, deliver)
        with self._lock:
            if not self._accepting:
                raise ServingError(503, "the server is shutting down", "server_error", "shutting_down")
            if self._waiting >= self.max_queue:
                self.metrics.rejected.inc()
                raise ServingError(
                    429,
                    f"the queue is full ({self.max_queue} requests wait); retry later",
                    "rate_limit_error",
                    "queue_full",
                )
            ticket.number = next(self._numbers)
            self._waiting += 1
            self._admitted.append(ticket)
            self.metrics.queue_length.set(self._waiting)
            self._lock.notify_all()
        return ticket

    def check(self, request: ServeRequest) -> None:
        if request.model not in self.model_names:
            raise ServingError(
                404,
                f"model {request.model!r} does not exist; this server has: {', '.join(self.model_names)}",
                code="model_not_found",
                param="model",
            )
        if not request.prompt_ids:
            raise ServingError(400, "the prompt is empty", param="prompt")
        # torch types a module's attributes as tensors or modules
        vocabulary = cast(int, self.model.model.get_input_embeddings().num_embeddings)
        if any(not 0 <= token < vocabulary for token in request.prompt_ids):
            raise ServingError(
                400, f"the prompt holds token ids outside the vocabulary [0, {vocabulary})", param="prompt"
            )
        if self.max_prompt_tokens is not None and len(request.prompt_ids) > self.max_prompt_tokens:
            raise ServingError(
                400,
                f"the prompt has {len(request.prompt_ids)} tokens; at most "
                f"{self.max_prompt_tokens} are served (the model's context: {self.context})",
                code="context_length_exceeded",
                param="prompt",
            )
        if self.context is not None and len(request.prompt_ids) + request.sampling.max_tokens > self.context:
            raise ServingError(
                400,
                f"prompt ({len(request.prompt_ids)} tokens) and max_tokens "
                f"({request.sampling.max_tokens}) exceed the model's context of {self.context} "
                "tokens",
                code="context_length_exceeded",
                param="max_tokens",
            )

    # ------------------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            with self._lock:
                while not (self._admitted or self._has_queued() or self._running or self._stopping):
                    self._lock.wait()
                if self._stopping and not (self._admitted or self._has_queued() or self._running):
                    return
                admitted = list(self._admitted)
                self._admitted.clear()
            if admitted:
                self._route(admitted)
            batch = self._batch
            if batch is None:
                key, tickets = self._next_batch()
                if key is not None and tickets:  # a batch has a key
                    self._start(key, tickets)
                continue
            newcomers = self._joining(batch)
            if newcomers:
                self._join(batch, newcomers)
            self._settle()  # a request cancelled since the last step ends before it
            if self._batch is not None:
                self._decode(batch.step)

    def _has_queued(self) -> bool:
        return any(self._queues.values())

    def _route(self, tickets: list[Ticket]) -> None:
        """Each ticket's route: forced by its `model`, else the router's (one batched prefill)."""
        automatic = [
            ticket
            for ticket in tickets
            if self.model.is_mediator and ticket.request.model in (AUTO, self.served_name) and not ticket.cancelled
        ]
        try:
            routed = (
                self.model.routes([ticket.request.route_ids or ticket.request.prompt_ids for ticket in automatic])
                if automatic
                else []
            )
        except Exception as error:  # a failed prefill fails those requests, not the server
            for ticket in automatic:
                self._fail(ticket, error)
            automatic, routed = [], []
        decided = dict(zip(map(id, automatic), routed))
        with self._lock:
            for ticket in tickets:
                if ticket.cancelled or (id(ticket) not in decided and ticket in automatic):
                    self._waiting -= 1
                    continue
                ticket.route = decided.get(id(ticket)) or self._forced_route(ticket.request.model)
                if ticket.route is not None:
                    self.metrics.route_decisions.labels(ticket.route.decision).inc()
                self._queues.setdefault(_route_key(ticket.route), deque()).append(ticket)
            self.metrics.queue_length.set(self._waiting)
        for ticket in tickets:
            if ticket.route is not None or not self.model.is_mediator:
                ticket.send(Event("route"))

    def _forced_route(self, model: str) -> Route | None:
        if self.model.router is None:  # not a mediator
            return None
        tasks = self.model.router.tasks
        if model == DENSE:
            return Route("dense", None, {task: 0.0 for task in tasks}, 0.0, 0.0, {})
        return Route("select", model, {task: float(task == model) for task in tasks}, 0.0, 0.0, {model: 1.0})

    def _next_batch(self) -> tuple[tuple | None, list[Ticket]]:
        """The route in place while it has requests and no other request waited past `max_wait`,
        else the route of the oldest request; up to `max_batch` of its requests."""
        with self._lock:
            for tickets in self._queues.values():
                while tickets and tickets[0].cancelled:
                    tickets.popleft()
                    self._waiting -= 1
            waiting = {key: tickets for key, tickets in self._queues.items() if tickets}
            if not waiting:
                self.metrics.queue_length.set(self._waiting)
                return None, []
            oldest = min(waiting, key=lambda key: waiting[key][0].number)
            key = self._in_place if self._in_place in waiting else oldest
            if key != oldest and time.monotonic() - waiting[oldest][0].submitted > self.max_wait:
                key = oldest
            tickets = waiting[key]
            batch: list[Ticket] = []
            while tickets and len(batch) < self.max_batch:
                ticket = tickets.popleft()
                self._waiting -= 1
                if not ticket.cancelled:
                    batch.append(ticket)
            self.metrics.queue_length.set(self._waiting)
            return key, batch

    def _joining(self, batch: DecodingBatch) -> list[Ticket]:
        """Requests of the route in place that join the running batch now: up to `max_batch` rows,
        none once another route's oldest request has waited past `max_wait` (the batch then runs
        out and the worker switches), none if the model's cache cannot take rows."""
        with self._lock:
            if not batch.takes_newcomers:
                return []
            waiting = self._queues.get(self._in_place) if self._in_place is not None else None
            if not waiting:
                return []
            now = time.monotonic()
            if any(
                tickets and key != self._in_place and now - tickets[0].submitted > self.max_wait
                for key, tickets in self._queues.items()
            ):
                return []
            joining: list[Ticket] = []
            while waiting and len(self._running) + len(joining) < self.max_batch:
                ticket = waiting.popleft()
                self._waiting -= 1
                if not ticket.cancelled:
                    joining.append(ticket)
            self.metrics.queue_length.set(self._waiting)
            return joining

    def _start(self, key: tuple, tickets: list[Ticket]) -> None:
        """A new batch of `tickets`, after switching to their route's weights."""
        try:
            self._switch_to(key, tickets[0].route)
        except Exception as error:  # a failed switch fails those requests, not the server
            for ticket in tickets:
                self._fail(ticket, error)
            return
        self._batch = DecodingBatch(self.model.model, self.pad_id, self.model.device)
        self._join(self._batch, tickets)

    def _join(self, batch: DecodingBatch, tickets: list[Ticket]) -> None:
        completions = [
            Completion(ticket.request.prompt_ids, ticket.request.sampling, self.tokenizer, self.end_ids)
            for ticket in tickets
        ]
        self._decode(functools.partial(batch.join, completions), tickets)

    def _decode(self, work: Callable[[], list[tuple[int, str]]], joining: Sequence[Ticket] = ()) -> None:
        """Run `work` (a join of `joining`, or a step) on the batch, stream what it releases and
        finish the requests that ended. A failure fails every request in the batch, not the server."""
        batch = self._batch
        assert batch is not None  # work runs on a batch
        self._running.extend(joining)
        try:
            released = work()
        except Exception as error:
            for ticket in self._running:
                self._fail(ticket, error)
            self._running, self._batch = [], None
            return
        now = time.monotonic()
        for row, text in released:
            ticket = self._running[row]
            if ticket.first_token is None:
                ticket.first_token = now
                self.metrics.time_to_first_token.observe(now - ticket.submitted)
            if text and not ticket.cancelled:
                ticket.send(Event("text", text))
        self._settle()

    def _settle(self) -> None:
        """End the rows of requests that were cancelled, and finish every request that ended."""
        batch = self._batch
        assert batch is not None
        for ticket, completion in zip(self._running, batch.completions):
            if ticket.cancelled:
                completion.cancelled = True
        ended = dict(batch.drop_ended())
        for row, completion in ended.items():
            self._finish(self._running[row], completion)
        self._running = [ticket for row, ticket in enumerate(self._running) if row not in ended]
        if not self._running:
            self._batch = None

    def _switch_to(self, key: tuple, route: Route | None) -> None:
        if key == self._in_place:
            return
        started = time.monotonic()
        self._in_place = None  # unknown until the switch is done (a failed switch puts D back)
        self.model.use_weights(route.weights() if route is not None else {})
        self._in_place = key
        self.metrics.route_switches.inc()
        self.metrics.switch_seconds.observe(time.monotonic() - started)

    def _finish(self, ticket: Ticket, completion: Completion) -> None:
        generated = len(completion.tokens)
        reason = completion.finish_reason or "cancelled"
        status = "cancelled" if completion.cancelled else "ok"
        self.metrics.requests.labels(_route_label(ticket.route), status).inc()
        self.metrics.prompt_tokens.inc(len(completion.prompt_ids))
        self.metrics.completion_tokens.inc(generated)
        if generated > 1 and ticket.first_token is not None:
            self.metrics.time_per_output_token.observe((time.monotonic() - ticket.first_token) / (generated - 1))
        ticket.send(
            Event("done", finish_reason=reason, prompt_tokens=len(completion.prompt_ids), completion_tokens=generated)
        )

    def _fail(self, ticket: Ticket, error: Exception) -> None:
        self.metrics.requests.labels(_route_label(ticket.route), "error").inc()
        failure = (
            error
            if isinstance(error, ServingError)
            else ServingError(500, f"generation failed: {type(error).__name__}: {error}", "server_error")
        )
        ticket.send(Event("error", error=failure))


def _route_key(route: Route | None) -> tuple:
    """Requests that share the weights share a batch: one key per expert, one for D, one per blend."""
    if route is None:
        return ("plain",)
    mix = route.weights()
    return (route.decision, tuple(sorted(mix.items())))


def _route_label(route: Route | None) -> str:
    return "plain" if route is None else route.decision


def _end_ids(model: RoutedModel) -> list[int]:
    """The tokens that end a sequence: the generation config's end tokens, else the tokenizer's."""
    configured = getattr(model.model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = model.tokenizer.eos_token_id
    return [configured] if isinstance(configured, int) else list(configured or [])
