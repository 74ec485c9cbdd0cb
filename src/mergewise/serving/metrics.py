"""The server's Prometheus metrics, in a registry of their own (the process-wide default registry is
left to whoever embeds the server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "mergewise_requests", "Finished requests by route and status", ["route", "status"], registry=registry
        )
        self.rejected = Counter(
            "mergewise_rejected_requests", "Requests refused because the queue was full", registry=registry
        )
        self.prompt_tokens = Counter("mergewise_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.completion_tokens = Counter("mergewise_completion_tokens", "Generated tokens", registry=registry)
        self.queue_length = Gauge("mergewise_queue_length", "Requests admitted and not yet decoding", registry=registry)
        self.route_decisions = Counter(
            "mergewise_route_decisions", "Routes given to requests", ["decision"], registry=registry
        )
        self.route_switches = Counter(
            "mergewise_route_switches", "Changes of the weights in the routed tensors", registry=registry
        )
        self.switch_seconds = Histogram(
            "mergewise_route_switch_seconds",
            "Time to write a route's weights",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "mergewise_time_to_first_token_seconds",
            "From admission to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "mergewise_time_per_output_token_seconds",
            "Between generated tokens after the first",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
