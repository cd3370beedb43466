"""Metrics, JSON logs and Celery task events, from real processes.

One private Redis (so no other worker takes these jobs and no other dispatcher takes
these events), a real worker and a real dispatcher, both with ``ATELIER_METRICS_PORT``
and ``ATELIER_LOG_FORMAT=json``; a webhook receiver; a Celery event receiver on the
broker. Two jobs run: one succeeds, one fails ``image_fetch_failed``. Then each test
scrapes or reads what those processes left.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from producer import Client
from producer.core import keys as K
from producer.core.settings import Settings
from producer.jobs.broker import make_celery, queue_depth
from producer.jobs.fleet import live_workers
from tests.helpers import stack_values, wait_until, worker_env
from tests.receiver import Receiver
from tests.servers import Process, RedisServer, Worker, api_process, dispatcher_process, free_port

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"atelier-test-webhook-secret-32by").decode()
API_KEY = "metrics-key-0123456789"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` as {(name, sorted labels): value}."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).raise_for_status().text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


class EventCapture(threading.Thread):
    """A real ``celery.events.EventReceiver`` on the broker, in a thread."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="event-capture", daemon=True)
        self.app = make_celery(settings, "event-capture")
        self.events: list[dict[str, Any]] = []
        self.receiver: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.app.connection() as conn:
                self.receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
                self.receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
        def matching() -> list[dict[str, Any]]:
            got = [e for e in list(self.events) if predicate(e)]
            assert got or self.error is None, self.error
            return got

        return wait_until(
            matching,
            timeout,
            message=lambda: f"no such event among {[e.get('type') for e in self.events]}",
        )

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.join(10)


@dataclass
class Ran:
    values: dict[str, Any]
    worker: Worker
    worker_port: int
    dispatcher: Process
    dispatcher_port: int
    receiver: Receiver
    ok: str = ""
    bad: str = ""
    #: The worker's replies to the first enable_events (as Flower sends it).
    enabled: list[Any] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def ran_values(redis_url: str, models_dir: Path, models_file: str, tmp: Path) -> dict[str, Any]:
    """The settings of the module's processes: JSON logs, one job at a time, webhooks
    retried soon, a heartbeat every 0.3 s."""
    return stack_values(
        redis_url,
        models_dir,
        models_file,
        f"file://{tmp / 'out'}",
        log_format="json",
        worker_concurrency=1,
        webhook_secret=SECRET,
        webhook_retry_schedule_s="0.3,0.3",
        webhook_read_timeout_s=2,
        webhook_connect_timeout_s=1,
        worker_heartbeat_s=0.3,
    )


def run_two_jobs(settings: Settings, receiver: Receiver) -> tuple[str, str]:
    """A job that succeeds and one that fails, each with a webhook (the failing one's
    receiver answers 500 first): their ids, once both have ended."""
    with Client(settings) as client:
        ok = client.submit(prompt="a lighthouse", steps=2, webhook=receiver.url("/ok"))
        # Nothing listens on port 1: the init image cannot be fetched.
        bad = client.submit(
            prompt="a lighthouse",
            steps=2,
            image="http://127.0.0.1:1/init.png",
            webhook=receiver.script("/flaky", 500, 204),
        )
        assert client.wait(ok, timeout=60)["status"] == "succeeded"
        failed = client.wait(bad, timeout=60)
        assert failed["status"] == "failed"
        assert failed["error"] and failed["error"]["code"] == "image_fetch_failed"
    return ok, bad


@pytest.fixture(scope="module")
def ran(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, models_file: str
) -> Iterator[Ran]:
    """The processes, after a successful and a failing job with webhooks."""
    tmp = tmp_path_factory.mktemp("metrics")
    redis_server = RedisServer(tmp / "redis").start()
    worker_port, dispatcher_port = free_port(), free_port()
    values = ran_values(redis_server.url, models_dir, models_file, tmp)
    settings = Settings(**values)
    worker = Worker(
        worker_env({**values, "metrics_port": worker_port}), tmp / "worker.log", ["tiny-sdxl"]
    )
    dispatcher = dispatcher_process(
        worker_env({**values, "metrics_port": dispatcher_port}), tmp / "dispatcher.log"
    )
    capture = EventCapture(settings)
    try:
        with Receiver() as receiver:
            worker.start()
            dispatcher.start()
            capture.start()
            # Subscribed once a worker heartbeat (every 2 s) has come through.
            capture.wait_for(lambda e: e["type"] == "worker-heartbeat")
            ran = Ran(values, worker, worker_port, dispatcher, dispatcher_port, receiver)
            # Task events start when a monitor asks, as Flower does every few seconds
            # (its enable_events option: a remote control command the worker answers).
            ran.enabled = wait_until(
                lambda: capture.app.control.enable_events(reply=True, timeout=2),
                30,
                interval=1.0,
                message="the worker's reply to enable_events",
            )
            ran.ok, ran.bad = run_two_jobs(settings, receiver)
            receiver.wait_for("/ok", 1)
            receiver.wait_for("/flaky", 2)
            for job_id, ended in ((ran.ok, "task-succeeded"), (ran.bad, "task-failed")):
                capture.wait_for(lambda e, j=job_id, t=ended: e["type"] == t and e["uuid"] == j)
            ran.events = list(capture.events)
            yield ran
    finally:
        capture.stop()
        dispatcher.stop()
        worker.stop()
        redis_server.stop()


def test_worker_metrics_count_jobs_by_outcome_and_time_them(ran: Ran) -> None:
    m = scrape(ran.worker_port)
    model = "tiny-sdxl"
    assert sample(m, "atelier_jobs_total", model=model, status="succeeded", error_code="") == 1
    assert (
        sample(
            m, "atelier_jobs_total", model=model, status="failed", error_code="image_fetch_failed"
        )
        == 1
    )
    # Both jobs started (queued time) and ended; only the successful one generated,
    # encoded and uploaded.
    assert sample(m, "atelier_job_queued_seconds_count", model=model) == 2
    assert sample(m, "atelier_job_duration_seconds_count", model=model) == 2
    for name in ("inference", "encode", "upload"):
        assert sample(m, f"atelier_job_{name}_seconds_count", model=model) == 1, name
    assert (sample(m, "atelier_job_inference_seconds_sum", model=model) or 0) > 0
    assert (sample(m, "atelier_job_upload_seconds_sum", model=model) or 0) > 0
    busy = sample(m, "atelier_worker_busy_seconds_total")
    assert busy is not None and busy > 0
    ratio = sample(m, "atelier_worker_busy_ratio")
    assert ratio is not None and 0 < ratio <= 1
    assert sample(m, "atelier_worker_jobs_in_progress") == 0
    assert (sample(m, "atelier_worker_resident_memory_bytes") or 0) > 10 * 2**20
    # A CPU worker never touches CUDA, so it reports no GPU memory.
    assert not any(name == "atelier_worker_gpu_memory_bytes" for name, _ in m)
    # Its reconciler ran and, every job healthy, had nothing to take back.
    for reason in K.RECONCILE_REASONS:
        assert sample(m, "atelier_reconciled_total", reason=reason) == 0, reason


def test_busy_time_grows_while_a_job_generates(ran: Ran) -> None:
    before = sample(scrape(ran.worker_port), "atelier_worker_busy_seconds_total") or 0.0
    with Client(Settings(**ran.values)) as client:
        # Long enough to be caught generating (cancelled once seen).
        job_id = client.submit(prompt="a slow lighthouse", steps=150, num_images=2)
        for ev in client.events(job_id, timeout=60):
            if ev["type"] == "job.progress":
                break
        during = scrape(ran.worker_port)
        assert sample(during, "atelier_worker_jobs_in_progress") == 1
        # The heartbeat says the same: busy with this job.
        store = client.store

        def busy_beat() -> dict[str, Any] | None:
            [beat] = live_workers(store.redis)
            return beat if beat["current_jobs"] == [job_id] else None

        beat = wait_until(
            busy_beat,
            10,
            interval=0.1,
            message=lambda: f"a heartbeat busy with {job_id}: {live_workers(store.redis)}",
        )
        assert beat["state"] == "busy" and beat["current_jobs"] == [job_id]
        client.cancel(job_id)
        assert client.wait(job_id, timeout=60)["status"] == "cancelled"
    after = scrape(ran.worker_port)
    assert (sample(during, "atelier_worker_busy_seconds_total") or 0) > before
    assert (sample(after, "atelier_worker_busy_seconds_total") or 0) >= (
        sample(during, "atelier_worker_busy_seconds_total") or 0
    )
    assert (
        sample(after, "atelier_jobs_total", model="tiny-sdxl", status="cancelled", error_code="")
        == 1
    )


def test_gpu_memory_gauges_come_from_the_memory_reading() -> None:
    # No CUDA here: the reading a CUDA worker's ``_memory`` returns, given by hand.
    from prometheus_client import generate_latest

    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics.watch(
        lambda: (["j1"], 3),
        lambda: {
            "rss_max_bytes": 1,
            "gpu_allocated_bytes": 5,
            "gpu_used_bytes": 7,
            "gpu_total_bytes": 11,
        },
    )
    metrics.job_ended("m", "failed", {"code": "timeout", "message": "x"}, {"queued_ms": 1500})
    text = generate_latest(metrics.registry).decode()
    m = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert [
        sample(m, "atelier_worker_gpu_memory_bytes", kind=k) for k in ("allocated", "used", "total")
    ] == [5, 7, 11]
    assert sample(m, "atelier_worker_jobs_in_progress") == 1
    assert sample(m, "atelier_jobs_total", model="m", status="failed", error_code="timeout") == 1
    assert sample(m, "atelier_job_queued_seconds_sum", model="m") == 1.5
    assert sample(m, "atelier_job_inference_seconds_count", model="m") is None


def test_dispatcher_metrics_count_outcomes(ran: Ran) -> None:
    m = scrape(ran.dispatcher_port)
    total = "atelier_webhook_deliveries_total"
    assert sample(m, total, event_type="job.succeeded", outcome="delivered") == 1
    assert sample(m, total, event_type="job.failed", outcome="retry") == 1
    assert sample(m, total, event_type="job.failed", outcome="delivered") == 1
    assert sample(m, "atelier_webhook_delivery_duration_seconds_count", outcome="delivered") == 2
    assert sample(m, "atelier_webhook_retries_pending") == 0
    assert sample(m, "atelier_metrics_scrape_errors_total") == 0
    for reason in K.RECONCILE_REASONS:
        assert sample(m, "atelier_reconciled_total", reason=reason) == 0, reason


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{path.name}: not a JSON line: {line!r}")
    return out


def test_celery_task_events_show_jobs_for_flower(ran: Ran) -> None:
    # Off until a monitor asked for them (ATELIER_TASK_EVENTS is off by default).
    assert [next(iter(r.values())) for r in ran.enabled] == [{"ok": "task events enabled"}]
    # A succeeded job reads SUCCESS in Flower, a failed one FAILURE, naming the job.
    for job_id, ended in ((ran.ok, "task-succeeded"), (ran.bad, "task-failed")):
        mine = [e for e in ran.events if e.get("uuid") == job_id]
        by_type = {e["type"]: e for e in mine}
        assert {"task-received", "task-started", ended} <= set(by_type), mine
        assert {"task-succeeded", "task-failed"} - {ended} - set(by_type), mine
        assert [e["type"] for e in mine].count("task-received") == 1, mine
        received = by_type["task-received"]
        assert received["name"] == K.TASK_GENERATE
        assert job_id in received["args"]
        assert received["hostname"].startswith("atelier@")
        assert by_type["task-started"]["hostname"] == received["hostname"]
        assert by_type[ended]["timestamp"] >= by_type["task-started"]["timestamp"]
    assert by_type["task-failed"]["exception"].startswith("JobEndedFailed"), by_type
    assert ran.bad in by_type["task-failed"]["exception"]
    # Failed or not, both messages were acknowledged: nothing left to run again.
    broker = redis.Redis.from_url(ran.values["redis_url"])
    assert broker.hlen("unacked") == 0
    assert queue_depth(broker, "tiny-sdxl") == 0


def test_json_logs_carry_the_job_id(ran: Ran) -> None:
    # Stopped first (the module's last use of them), so their logs are whole.
    ran.worker.stop()
    ran.dispatcher.stop()
    lines = json_lines(ran.worker.log_path)
    assert lines and all({"ts", "level", "logger", "message"} <= set(d) for d in lines)
    for job_id in (ran.ok, ran.bad):
        about = [d for d in lines if job_id in d["message"]]
        # atelier's own line and Celery's received/succeeded lines, at least.
        assert len(about) >= 3, about
        assert all(d.get("job_id") == job_id for d in about), about
        loggers = {d["logger"] for d in about}
        assert "worker.run" in loggers and any(n.startswith("celery") for n in loggers)
    assert any("warm shutdown" in d["message"] for d in lines)
    # No line names one job while carrying the other's id.
    for d in lines:
        if "job_id" in d:
            other = ran.bad if d["job_id"] == ran.ok else ran.ok
            assert other not in d["message"], d
    dispatched = json_lines(ran.dispatcher.log_path)
    webhook_lines = [d for d in dispatched if d["message"].startswith("webhook ")]
    assert len(webhook_lines) == 3
    assert {d["job_id"] for d in webhook_lines} == {ran.ok, ran.bad}


# -- the API ----------------------------------------------------------------------


def submit_idle_jobs(http: httpx.Client, auth: dict[str, str]) -> list[str]:
    """Three jobs on tiny-idle, which no worker serves: they wait."""
    return [
        http.post(
            "/v1/jobs", headers=auth, json={"prompt": "a lighthouse", "model": "tiny-idle"}
        ).json()["id"]
        for _ in range(3)
    ]


def check_the_queue_gauges(port: int) -> None:
    m = scrape(port)
    assert sample(m, "atelier_queue_depth", model="tiny-idle") == 3
    assert sample(m, "atelier_jobs_queued", model="tiny-idle") == 3
    assert (sample(m, "atelier_queue_oldest_age_seconds", model="tiny-idle") or 0) > 0
    assert sample(m, "atelier_queue_depth", model="tiny-sdxl") == 0
    assert sample(m, "atelier_queue_oldest_age_seconds", model="tiny-sdxl") == 0
    assert (
        sample(m, "atelier_api_requests_total", method="GET", route="/v1/queues", status="200") == 1
    )


def check_a_scrape_with_redis_down(port: int) -> None:
    down = scrape(port)  # still answers, without the Redis-backed gauges
    assert not any(name == "atelier_queue_depth" for name, _ in down)
    assert (sample(down, "atelier_metrics_scrape_errors_total") or 0) >= 1
    assert (
        sample(down, "atelier_api_requests_total", method="GET", route="/metrics", status="200")
        == 1
    )


def check_the_api_log(log_path: Path, ids: list[str]) -> None:
    lines = json_lines(log_path)
    # uvicorn's own lines are JSON too (startup and the access log).
    loggers = {d["logger"] for d in lines}
    assert {"uvicorn.error", "uvicorn.access"} <= loggers, loggers
    for job_id in ids:
        about = [d for d in lines if job_id in d["message"]]
        assert about and all(d.get("job_id") == job_id for d in about), about
    # The job's own route: uvicorn's access line names it, and carries its id.
    [get] = [
        d for d in lines if d["logger"] == "uvicorn.access" and "GET /v1/jobs/" in d["message"]
    ]
    assert get["job_id"] == ids[0]


def test_api_reports_queues_and_survives_redis_outage(
    tmp_path: Path, models_dir: Path, models_file: str
) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    values = stack_values(
        redis_server.url,
        models_dir,
        models_file,
        f"file://{tmp_path / 'out'}",
        log_format="json",
        api_keys=API_KEY,
        rate_limit_per_s=0,
    )
    api = api_process(worker_env(values), tmp_path / "api.log")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        api.start()
        assert api.port is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{api.port}", timeout=10) as http:
            ids = submit_idle_jobs(http, auth)
            time.sleep(0.05)
            assert http.get(f"/v1/jobs/{ids[0]}", headers=auth).status_code == 200
            assert http.get("/v1/queues", headers=auth).status_code == 200
            check_the_queue_gauges(api.port)

            redis_server.stop()
            check_a_scrape_with_redis_down(api.port)
    finally:
        api.stop()
        redis_server.stop()
    check_the_api_log(api.log_path, ids)
