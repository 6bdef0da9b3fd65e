"""Prometheus metrics of one server, in their own registry, served over HTTP on ``--metrics-port``.

Per-request counters and histograms are updated on the event loop when a request ends (from
``RequestOutput.metrics``); the engine's gauges and cumulative prefix-cache counts come from a
snapshot of ``get_load()`` that a loop task refreshes, so a scrape never waits on the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.outputs import RequestMetrics

logger = logging.getLogger("sluice.requests")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_PER_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                      1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """What the server records about a request that ended (never its text)."""

    request_id: str
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    metrics: RequestMetrics | None
    ended_at: float  # time.monotonic() when the server saw it end (aborts carry no finished_time)

    def timings(self) -> dict[str, float]:
        """Seconds: queue (arrival to first scheduled), ttft, e2e and per output token, where known."""
        m = self.metrics
        if m is None:
            return {}
        finished = m.finished_time if m.finished_time is not None else self.ended_at
        out = {"e2e_s": finished - m.arrival_time}
        if m.first_scheduled_time is not None:
            out["queue_s"] = m.first_scheduled_time - m.arrival_time
        if m.first_token_time is not None:
            out["ttft_s"] = m.first_token_time - m.arrival_time
            if self.generation_tokens > 1:
                out["tpot_s"] = (finished - m.first_token_time) / (self.generation_tokens - 1)
        return out


class _LoadCollector(Collector):
    """The engine's gauges and cumulative prefix-cache counts from the latest load snapshot."""

    def __init__(self) -> None:
        self.load: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        load = self.load
        yield GaugeMetricFamily("sluice:num_requests_running", "Requests in the running batch.",
                                value=load.get("num_running", 0))
        yield GaugeMetricFamily("sluice:num_requests_waiting", "Requests waiting to be scheduled.",
                                value=load.get("num_waiting", 0))
        total = load.get("kv_blocks_total", 0)
        yield GaugeMetricFamily("sluice:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
                                value=load.get("kv_blocks_used", 0) / total if total else 0.0)
        yield CounterMetricFamily("sluice:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=load.get("prefix_cache_queries", 0))
        yield CounterMetricFamily("sluice:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=load.get("prefix_cache_hits", 0))
        yield CounterMetricFamily("sluice:num_preemptions", "Requests preempted to free KV-cache blocks.",
                                  value=load.get("num_preemptions", 0))
        yield GaugeMetricFamily("sluice:generation_tokens_per_second",
                                "Output tokens per second over the last 10 seconds.",
                                value=load.get("generation_tokens_per_s", 0.0))
        yield CounterMetricFamily("sluice:spec_decode_num_draft_tokens",
                                  "Draft tokens proposed to speculative decoding's verify steps.",
                                  value=load.get("spec_decode_num_draft_tokens", 0))
        yield CounterMetricFamily("sluice:spec_decode_num_accepted_tokens", "Draft tokens the target accepted.",
                                  value=load.get("spec_decode_num_accepted_tokens", 0))


class ServerMetrics:
    """The server's metrics in a registry of their own (several servers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._load = _LoadCollector()
        self.registry.register(self._load)
        r = self.registry
        self.request_success = Counter("sluice:request_success", "Requests ended, by finish reason.",
                                       ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("sluice:prompt_tokens", "Prompt tokens of ended requests.", registry=r)
        self.generation_tokens = Counter("sluice:generation_tokens", "Tokens generated for ended requests.",
                                         registry=r)
        self.ttft = Histogram("sluice:time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("sluice:time_per_output_token_seconds", "Mean time per token after the first.",
                              buckets=_PER_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("sluice:e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("sluice:request_queue_time_seconds", "Arrival to first scheduled.",
                                    buckets=_LATENCY_BUCKETS, registry=r)

    def set_load(self, load: dict[str, Any]) -> None:
        """Replace the engine snapshot the next scrape reports."""
        self._load.load = dict(load)

    def record(self, done: FinishedRequest) -> None:
        """Count one ended request and log it (id, reason, token counts, timings)."""
        self.request_success.labels(finished_reason=done.finish_reason).inc()
        self.prompt_tokens.inc(done.prompt_tokens)
        self.generation_tokens.inc(done.generation_tokens)
        timings = done.timings()
        for key, histogram in (("ttft_s", self.ttft), ("tpot_s", self.tpot), ("e2e_s", self.e2e),
                               ("queue_s", self.queue_time)):
            if key in timings:
                histogram.observe(timings[key])
        log_request(done, timings)

    def serve_http(self, host: str, port: int) -> Any:
        """Start the /metrics HTTP server in a daemon thread; the ``HTTPServer`` (``shutdown()`` it)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


def log_request(done: FinishedRequest, timings: dict[str, float]) -> None:
    fields = {"request_id": done.request_id, "finish_reason": done.finish_reason,
              "prompt_tokens": done.prompt_tokens, "generation_tokens": done.generation_tokens,
              **{k: round(v, 6) for k, v in timings.items()}}
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    logger.info("request finished: %s", text, extra={"fields": fields})
