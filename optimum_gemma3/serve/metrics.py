"""The server's Prometheus metrics, in a registry of their own (one per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a loaded step (tens of ms) to a long queue wait.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30)


class ServingMetrics:
    """Requests, queue, slots, tokens and latencies, as `GET /metrics` shows them."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "optimum_gemma3_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.queue_length = Gauge(
            "optimum_gemma3_queue_length",
            "Requests waiting for a free slot.",
            registry=self.registry,
        )
        self.active_slots = Gauge(
            "optimum_gemma3_active_slots",
            "Cache slots held by a request being generated.",
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "optimum_gemma3_prompt_tokens",
            "Prompt tokens prefilled.",
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "optimum_gemma3_generated_tokens",
            "Tokens generated.",
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "optimum_gemma3_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "optimum_gemma3_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
