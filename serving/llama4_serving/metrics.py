"""Prometheus metrics of one engine replica (`llama4_` prefix, base units, `_total` counters).

Each engine keeps its own registry, served on the replica's metrics port (see
`ServingConfig.metrics_port`), so several engines in one process never collide.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; spans a tiny CPU model's milliseconds up to a large model's long requests.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineMetrics:
    """The metrics one engine records; label `model_name` is the served model name."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter(
            "llama4_prompt_tokens", "Prompt tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "llama4_generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.requests = Counter(
            "llama4_requests",
            "Requests finished, by finish reason (stop, length, abort, error).",
            [*labels, "finish_reason"],
            registry=r,
        )
        self.request_duration = Histogram(
            "llama4_request_duration_seconds",
            "Time from arrival to the last token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "llama4_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "llama4_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request.",
            labels,
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "llama4_requests_running", "Requests being decoded.", labels, registry=r
        )
        self.waiting = Gauge(
            "llama4_requests_waiting", "Requests queued for prefill.", labels, registry=r
        )
        self.waiting_prompt_tokens = Gauge(
            "llama4_prompt_tokens_waiting",
            "Prompt tokens not yet prefilled (queued requests plus the rest of those prefilling).",
            labels,
            registry=r,
        )
        # Exported as 0 from the start: an idle replica's backlog is a measurement, not a gap.
        self.waiting_prompt_tokens.labels(model_name).set(0)
        self.kv_cache_usage = Gauge(
            "llama4_kv_cache_usage_ratio",
            "Cached tokens over KV-cache capacity (max_num_seqs x max_model_len).",
            labels,
            registry=r,
        )
        self.routed_tokens = Counter(
            "llama4_expert_routed_tokens",
            "Tokens routed to each expert of each MoE layer (layer: model layer index).",
            [*labels, "layer", "expert"],
            registry=r,
        )

    def observe_step(
        self,
        running: int,
        waiting: int,
        kv_usage: float,
        routed: Sequence[tuple[int, Sequence[int]]],
        waiting_prompt_tokens: int = 0,
    ) -> None:
        """Record one engine step; `routed` pairs a layer index with tokens per expert."""
        name = self.model_name
        self.running.labels(name).set(running)
        self.waiting.labels(name).set(waiting)
        self.waiting_prompt_tokens.labels(name).set(waiting_prompt_tokens)
        self.kv_cache_usage.labels(name).set(kv_usage)
        for layer, counts in routed:
            for expert, count in enumerate(counts):
                if count:
                    self.routed_tokens.labels(name, str(layer), str(expert)).inc(count)

    def observe_finish(
        self,
        *,
        finish_reason: str,
        prompt_tokens: int,
        generated_tokens: int,
        duration_s: float,
        first_token_s: float | None,
        last_token_s: float | None,
    ) -> None:
        """Record a finished request; times are seconds since its arrival."""
        name = self.model_name
        self.requests.labels(name, finish_reason).inc()
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generation_tokens.labels(name).inc(generated_tokens)
        self.request_duration.labels(name).observe(duration_s)
        if first_token_s is not None:
            self.time_to_first_token.labels(name).observe(first_token_s)
            if last_token_s is not None and generated_tokens > 1:
                self.time_per_output_token.labels(name).observe(
                    (last_token_s - first_token_s) / (generated_tokens - 1)
                )

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
