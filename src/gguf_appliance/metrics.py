from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .engine import DoneEvent, Engine

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)


class Metrics:
    """The node's Prometheus metrics, in a registry of its own (one per app, no globals)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        p = "gguf_appliance_"
        self.requests = Counter(
            p + "requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            p + "request_duration_seconds",
            "Time from request to the end of the response.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            p + "time_to_first_token_seconds",
            "Time from submission to the first token.",
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        registry.register(_TokenCollector(engine))
        self.generations = Counter(
            p + "generations",
            "Finished generations by finish reason.",
            ["finish_reason"],
            registry=registry,
        )
        Gauge(p + "queue_depth", "Requests waiting for a slot.", registry=registry).set_function(
            lambda: engine.queue_depth
        )
        Gauge(
            p + "busy_slots", "Slots generating or reading a prompt.", registry=registry
        ).set_function(lambda: engine.busy_slots)
        Gauge(p + "slots", "Slots of the engine.", registry=registry).set(engine.config.n_slots)
        # Read on the event loop (in the /metrics handler): tasks alive now, a leak detector.
        Gauge(
            p + "event_loop_tasks", "Tasks on the server's event loop.", registry=registry
        ).set_function(lambda: len(asyncio.all_tasks()))
        Gauge(
            p + "model_load_seconds",
            "Seconds the model took to load (0 until loaded).",
            registry=registry,
        ).set_function(lambda: engine.load_seconds or 0.0)
        Gauge(
            p + "grammar_workers",
            "Grammar worker processes: one per request with a grammar, and one kept idle.",
            registry=registry,
        ).set_function(lambda: engine.grammars.workers if engine.grammars else 0)
        Gauge(p + "ready", "1 when the node takes requests.", registry=registry).set_function(
            lambda: float(engine.ready and not engine.draining)
        )

        self.loop_lag_seconds = Histogram(
            p + "event_loop_lag_seconds",
            "How late the event loop ran a timer due every 10 ms: time it was held by one task.",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        engine.watch(self.observe_generation)

    async def watch_event_loop(self, interval: float = 0.01) -> None:
        """Run until cancelled: every `interval`, note how late the loop woke this task."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag_seconds.observe(max(0.0, loop.time() - due))

    def observe_generation(self, done: DoneEvent) -> None:
        self.generations.labels(done.finish_reason).inc()
        if done.time_to_first_token is not None:
            self.ttft_seconds.observe(done.time_to_first_token)


class _TokenCollector(Collector):
    """Token counts read live from the engine, so they grow while an answer streams."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        prompt, cached, completion = self.engine.token_totals()
        yield CounterMetricFamily(
            "gguf_appliance_prompt_tokens", "Prompt tokens evaluated.", value=prompt
        )
        yield CounterMetricFamily(
            "gguf_appliance_prompt_tokens_cached",
            "Prompt tokens not evaluated: their KV was reused from the slot's last request.",
            value=cached,
        )
        yield CounterMetricFamily(
            "gguf_appliance_completion_tokens", "Tokens generated.", value=completion
        )
