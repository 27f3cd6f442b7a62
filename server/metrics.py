"""Prometheus metrics (vLLM-like names under `tandem:`) on a private registry.

Latency histograms and token counters are fed from each request's stream; the gauges read
`engine.stats()` when scraped, so they are never stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from engine.types import FinishReason, RequestOutput
    from server.engines import ServedEngine

_LABEL = "model_name"
# fmt: off
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
# fmt: on


class Metrics:
    def __init__(self, engines: Callable[[], Mapping[str, ServedEngine]]) -> None:
        self.registry = CollectorRegistry()
        self._http: WSGIServer | None = None
        self.ttft = Histogram(
            "tandem:time_to_first_token_seconds",
            "Time from arrival to the first token.",
            [_LABEL],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "tandem:inter_token_latency_seconds",
            "Time between consecutive streamed tokens.",
            [_LABEL],
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "tandem:e2e_request_latency_seconds",
            "Time from arrival to the final token.",
            [_LABEL],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "tandem:request_queue_time_seconds",
            "Time from arrival to the first schedule.",
            [_LABEL],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tandem:prompt_tokens",
            "Prompt tokens of finished requests.",
            [_LABEL],
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "tandem:generation_tokens",
            "Generated tokens streamed to clients.",
            [_LABEL],
            registry=self.registry,
        )
        self.request_success = Counter(
            "tandem:request_success",
            "Finished requests by finish reason.",
            [_LABEL, "finished_reason"],
            registry=self.registry,
        )
        self.registry.register(_EngineStatsCollector(engines))

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint in a daemon thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def for_request(self, model_id: str) -> RequestMetrics:
        return RequestMetrics(self, model_id)


class RequestMetrics:
    """Observes one request's outputs as they stream; cheap per step (a few lock-protected adds)."""

    def __init__(self, metrics: Metrics, model_id: str) -> None:
        self._metrics = metrics
        self._model_id = model_id
        self._inter_token = metrics.inter_token.labels(model_id)
        self._generation_tokens = metrics.generation_tokens.labels(model_id)
        self._last_token_time: float | None = None

    def observe(self, output: RequestOutput) -> None:
        now = time.monotonic()
        count = len(output.token_ids)
        if count:
            if self._last_token_time is not None:
                # Several tokens in one delta (text held back for a stop string) share the gap.
                gap = (now - self._last_token_time) / count
                for _ in range(count):
                    self._inter_token.observe(gap)
            self._last_token_time = now
            self._generation_tokens.inc(count)
        if output.finish_reason is not None:
            self._observe_finished(output, output.finish_reason, now)

    def _observe_finished(self, output: RequestOutput, reason: FinishReason, now: float) -> None:
        m, model = self._metrics, self._model_id
        m.request_success.labels(model, reason.value).inc()
        m.prompt_tokens.labels(model).inc(output.prompt_tokens)
        m.e2e.labels(model).observe(now - output.arrival_time)
        # Zero timestamps: aborted before being scheduled or before its first token.
        if output.first_scheduled_time:
            m.queue_time.labels(model).observe(output.first_scheduled_time - output.arrival_time)
        if output.first_token_time:
            m.ttft.labels(model).observe(output.first_token_time - output.arrival_time)


class _EngineStatsCollector:
    def __init__(self, engines: Callable[[], Mapping[str, ServedEngine]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "tandem:num_requests_running", "Requests in the running batch.", labels=[_LABEL]
        )
        waiting = GaugeMetricFamily(
            "tandem:num_requests_waiting", "Requests waiting to be scheduled.", labels=[_LABEL]
        )
        kv_usage = GaugeMetricFamily(
            "tandem:kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0 to 1, as vLLM reports it).",
            labels=[_LABEL],
        )
        prefix_queries = CounterMetricFamily(
            "tandem:prefix_cache_queries",
            "Prompt tokens of admitted requests, looked up in the prefix cache.",
            labels=[_LABEL],
        )
        prefix_hits = CounterMetricFamily(
            "tandem:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not prefilled again).",
            labels=[_LABEL],
        )
        preemptions = CounterMetricFamily(
            "tandem:num_preemptions",
            "Running requests sent back to the queue to free KV cache blocks (they recompute).",
            labels=[_LABEL],
        )
        # A snapshot: this runs on the HTTP thread while the event loop may add models.
        for model_id, engine in list(self._engines().items()):
            stats = engine.stats()
            running.add_metric([model_id], stats.num_running)
            waiting.add_metric([model_id], stats.num_waiting)
            kv_usage.add_metric([model_id], stats.kv_blocks_used / max(1, stats.kv_blocks_total))
            prefix_queries.add_metric([model_id], stats.prefix_cache_queries)
            prefix_hits.add_metric([model_id], stats.prefix_cache_hits)
            preemptions.add_metric([model_id], stats.num_preemptions)
        yield from (running, waiting, kv_usage, prefix_queries, prefix_hits, preemptions)
