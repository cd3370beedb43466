"""Prometheus metrics of the producer side: the API's queue gauges and the dispatcher's
webhook deliveries. (The worker's are in ``worker/metrics.py``.)

Each process keeps its metrics in its own :class:`~prometheus_client.CollectorRegistry`
(nothing global, so tests and embedded uses build as many as they like). Gauges that
describe the fleet (queues, pending retries) are read from Redis when Prometheus
scrapes, so every replica reports the same numbers; a scrape while Redis is down leaves
them out and counts ``atelier_metrics_scrape_errors_total`` instead of failing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer.core import keys as K
from producer.core.contract import Kind

log = logging.getLogger("atelier.metrics")

#: Webhook round trips: a receiver answers in milliseconds, or times out after
#: ``webhook_read_timeout_s`` (15 s by default).
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)


class RedisGauges(Collector):
    """Gauges computed from Redis at scrape time by ``read``; a Redis error skips them
    and counts a scrape error."""

    def __init__(self, read: Callable[[], Iterator[Metric]]) -> None:
        self.read = read
        self.errors = 0
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        try:
            metrics = list(self.read())
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable, queue gauges left out: %s", exc)
            with self._lock:
                self.errors += 1
            metrics = []
        yield from metrics
        errors = CounterMetricFamily(
            "atelier_metrics_scrape_errors", "Scrapes whose Redis-backed gauges failed"
        )
        errors.add_metric([], self.errors)
        yield errors


def queue_gauges(report: Callable[[], list[dict[str, Any]]]) -> Callable[[], Iterator[Metric]]:
    """The API's per-model queue gauges, from :func:`producer.jobs.fleet.queue_report`."""

    def read() -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "atelier_queue_depth",
            "Messages waiting in the model's Celery queue (what KEDA scales on)",
            labels=["model"],
        )
        queued = GaugeMetricFamily(
            "atelier_jobs_queued",
            "Jobs of the model waiting for a worker (queued, or taken back from a lost worker)",
            labels=["model"],
        )
        oldest = GaugeMetricFamily(
            "atelier_queue_oldest_age_seconds",
            "Age of the model's oldest queued job (0 when none is queued)",
            labels=["model"],
        )
        for row in report():
            if row.get("kind", Kind.GENERATE) != Kind.GENERATE:
                continue  # trainings' queues: GET /v1/queues (KEDA reads their lists)
            depth.add_metric([row["model"]], row["depth"])
            queued.add_metric([row["model"]], row["queued"])
            oldest.add_metric([row["model"]], row["oldest_age_s"] or 0.0)
        yield from (depth, queued, oldest)

    return read


def reconciled_counter(registry: CollectorRegistry) -> Counter:
    """``atelier_reconciled_total{reason}``: what this process's reconciler passes did
    (``constants.RECONCILE_REASONS``), on the worker's and the dispatcher's metrics."""
    counter = Counter(
        "atelier_reconciled",
        "Actions of the reconciler: leases taken back, "
        "jobs ended worker_lost, lost messages re-published, dead dispatcher "
        "consumers removed",
        ["reason"],
        registry=registry,
    )
    for reason in K.RECONCILE_REASONS:  # every series from zero, so rate() sees the first
        counter.labels(reason)
    return counter


class DispatcherMetrics:
    """Webhook delivery outcomes and durations, and the retries waiting in Redis."""

    def __init__(self, r: redis.Redis, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.deliveries = Counter(
            "atelier_webhook_deliveries",
            "Webhook delivery attempts by event type and "
            "outcome (delivered, retry, failed, gave_up)",
            ["event_type", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "atelier_webhook_delivery_duration_seconds",
            "Webhook delivery attempt duration",
            ["outcome"],
            buckets=WEBHOOK_BUCKETS,
            registry=self.registry,
        )
        self.reconciled = reconciled_counter(self.registry)

        def read() -> Iterator[Metric]:
            pending = GaugeMetricFamily(
                "atelier_webhook_retries_pending", "Webhook deliveries waiting for a retry"
            )
            count: Any = r.zcard(K.WEBHOOK_RETRIES)
            pending.add_metric([], int(count))
            yield pending

        self.registry.register(RedisGauges(read))

    def delivered(self, event_type: str, outcome: str, duration_ms: int) -> None:
        self.deliveries.labels(event_type, outcome).inc()
        self.duration.labels(outcome).observe(duration_ms / 1000)


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread."""
    start_http_server(port, addr=addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)


__all__ = ["DispatcherMetrics", "RedisGauges", "queue_gauges", "serve"]
