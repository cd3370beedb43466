"""The worker's Prometheus metrics, served on ``ATELIER_METRICS_PORT`` when > 0.

- ``atelier_job_{queued,inference,encode,upload,duration}_seconds{model}``: histograms
  of each finished job's ``timings`` (duration: created to finished);
- ``atelier_jobs_total{model,status,error_code}``: jobs this worker ended (error_code
  ``""`` unless failed);
- ``atelier_worker_busy_seconds_total``: time a generation held the GPU
  (``rate()`` of it is the busy ratio), and ``atelier_worker_busy_ratio`` over the
  last ``BUSY_WINDOW_S``;
- ``atelier_worker_jobs_in_progress``: jobs held now (generating or post-processing);
- ``atelier_reconciled_total{reason}``: what this process's reconciler passes did;
- ``atelier_worker_resident_memory_bytes``, and on CUDA
  ``atelier_worker_gpu_memory_bytes{kind=allocated|used|total}``.

Observations are made after a step of a job is over (never inside the denoising
loop); gauges are read when Prometheus scrapes, on the metrics server's thread.
"""

from __future__ import annotations

import collections
import resource
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer.core.contract import ErrorInfo
from producer.core.metrics import reconciled_counter

#: Time in the queue: from an instant to hours when the fleet is behind.
QUEUED_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
)
#: Generation: fractions of a second (tiny models, few steps) to minutes (large, many).
INFERENCE_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    300.0,
    600.0,
)
#: Encoding and upload of a job's images: milliseconds to a minute (upload retries).
POST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: The busy ratio gauge looks back this far.
BUSY_WINDOW_S = 60.0

_TIMINGS = {  # a job record's timings key: (histogram name, help, buckets)
    "queued_ms": ("atelier_job_queued_seconds", "Time from submission to start", QUEUED_BUCKETS),
    "inference_ms": ("atelier_job_inference_seconds", "Generation time (GPU)", INFERENCE_BUCKETS),
    "encode_ms": ("atelier_job_encode_seconds", "Image encoding time", POST_BUCKETS),
    "upload_ms": ("atelier_job_upload_seconds", "Upload time (images and manifest)", POST_BUCKETS),
    "total_ms": ("atelier_job_duration_seconds", "Time from submission to the end", QUEUED_BUCKETS),
}


class BusyClock:
    """Time the GPU was held: a running total, and the share of a recent window.

    ``begin``/``end`` bracket each hold (one at a time: the lifecycle's GPU lock); a hold
    still going counts up to now, so the total grows smoothly during a long job.
    """

    def __init__(self, window_s: float = BUSY_WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._spans: collections.deque[tuple[float, float]] = collections.deque()
        self._since: float | None = None
        self._total = 0.0
        self._born = time.monotonic()

    def begin(self) -> None:
        with self._lock:
            self._since = time.monotonic()

    def end(self) -> None:
        with self._lock:
            if self._since is None:
                return
            now = time.monotonic()
            self._spans.append((self._since, now))
            self._total += now - self._since
            self._since = None
            while self._spans and self._spans[0][1] < now - self.window_s:
                self._spans.popleft()

    def total(self) -> float:
        with self._lock:
            running = time.monotonic() - self._since if self._since is not None else 0.0
            return self._total + running

    def ratio(self) -> float:
        """Busy share of the last ``window_s`` (of the process's life, if shorter)."""
        with self._lock:
            now = time.monotonic()
            start = max(now - self.window_s, self._born)
            spans = list(self._spans)
            if self._since is not None:
                spans.append((self._since, now))
        if now <= start:
            return 0.0
        busy = sum(max(0.0, b - max(a, start)) for a, b in spans)
        return min(1.0, busy / (now - start))


class WorkerMetrics:
    """What the lifecycle reports: finished jobs and GPU holds."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.timings = {
            key: Histogram(name, help_, ["model"], buckets=buckets, registry=self.registry)
            for key, (name, help_, buckets) in _TIMINGS.items()
        }
        self.jobs = Counter(
            "atelier_jobs",
            "Jobs ended by this worker, by status and error code",
            ["model", "status", "error_code"],
            registry=self.registry,
        )
        self.reconciled = reconciled_counter(self.registry)
        self.busy = BusyClock()

    def job_ended(
        self, model: str, status: str, error: ErrorInfo | None, timings: dict[str, int] | None
    ) -> None:
        code = (error.get("code") if error else None) or ""
        self.jobs.labels(model, status, code).inc()
        for key, ms in (timings or {}).items():
            hist = self.timings.get(key)
            if hist is not None and ms is not None:
                hist.labels(model).observe(ms / 1000)

    def watch(
        self, activity: Callable[[], tuple[list[str], int]], memory: Callable[[], dict[str, int]]
    ) -> None:
        """Scrape-time gauges: ``activity`` is ``Lifecycle.activity``, ``memory`` returns
        ``gpu_*_bytes`` on CUDA (see :func:`worker.heartbeat.memory`)."""
        self.registry.register(_Gauges(self.busy, activity, memory))


class _Gauges(Collector):
    def __init__(
        self,
        busy: BusyClock,
        activity: Callable[[], tuple[list[str], int]],
        memory: Callable[[], dict[str, int]],
    ) -> None:
        self.busy, self.activity, self.memory = busy, activity, memory

    def collect(self) -> Iterator[Metric]:
        busy = CounterMetricFamily("atelier_worker_busy_seconds", "Time a generation held the GPU")
        busy.add_metric([], self.busy.total())
        yield busy
        ratio = GaugeMetricFamily(
            "atelier_worker_busy_ratio",
            f"Share of the last {BUSY_WINDOW_S:g} s a generation held the GPU",
        )
        ratio.add_metric([], self.busy.ratio())
        yield ratio
        current, _ = self.activity()
        held = GaugeMetricFamily(
            "atelier_worker_jobs_in_progress", "Jobs held now (generating or post-processing)"
        )
        held.add_metric([], len(current))
        yield held
        rss = GaugeMetricFamily(
            "atelier_worker_resident_memory_bytes", "Resident memory of the worker process"
        )
        rss.add_metric([], resident_bytes())
        yield rss
        mem = self.memory()
        if "gpu_total_bytes" in mem:
            gpu = GaugeMetricFamily(
                "atelier_worker_gpu_memory_bytes",
                "GPU memory: allocated by torch, used on the device (all processes), device total",
                labels=["kind"],
            )
            for kind in ("allocated", "used", "total"):
                gpu.add_metric([kind], mem[f"gpu_{kind}_bytes"])
            yield gpu


def resident_bytes() -> int:
    """Resident memory now (``/proc``), or the peak where there is no ``/proc``."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["BusyClock", "WorkerMetrics", "resident_bytes"]
