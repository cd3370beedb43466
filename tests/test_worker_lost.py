"""A job that kills its worker every time ends worker_lost after MAX_ATTEMPTS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import Client
from producer.contract import EventType, Status
from producer.settings import Settings
from tests.conftest import stack_values, worker_env
from tests.servers import RedisServer, Worker

pytestmark = pytest.mark.slow


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    # Its own Redis, so the shared worker cannot take the job.
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def wait_for(client: Client, job_id: str, etype: EventType, after: str | None,
             timeout: float = 60) -> str:
    for ev in client.events(job_id, after=after, timeout=timeout):
        if ev["type"] == etype:
            return str(ev["id"])
    raise AssertionError(f"job ended before {etype}")


def test_poison_job_ends_worker_lost(private_redis: RedisServer, models_dir: Path,
                                     models_file: str, tmp_path: Path) -> None:
    values = stack_values(private_redis.url, models_dir, models_file,
                          f"file://{tmp_path / 'store'}", max_attempts=2,
                          visibility_timeout_s=2, worker_concurrency=1)
    env = worker_env(values)
    log = tmp_path / "worker.log"
    with Client(Settings(**values)) as client:
        job_id = client.submit(prompt="kills its worker", steps=150)
        last = None
        for attempt in (1, 2):
            worker = Worker(env, log, ["tiny-sdxl"]).start()
            try:
                last = wait_for(client, job_id, EventType.STARTED, last)
                assert client.get(job_id)["attempts"] == attempt
                worker.kill()  # SIGKILL mid-denoise: no ack, no word
            finally:
                worker.stop()
        assert client.get(job_id)["status"] == Status.RUNNING

        # A third worker gets the message back after the visibility timeout, sees two
        # lost attempts, and ends the job instead of running it again.
        worker = Worker(env, log, ["tiny-sdxl"]).start()
        try:
            started = time.monotonic()
            record = client.wait(job_id, timeout=60)
            assert record["status"] == Status.FAILED, record
            assert record["error"]["code"] == "worker_lost"
            assert record["attempts"] == 2
            assert time.monotonic() - started < 30
            types = [e["type"] for e in client.events(job_id, timeout=5)]
            assert types.count(EventType.STARTED) == 2
            assert types.count(EventType.RETRYING) == 1
            assert types[-1] == EventType.FAILED
            # ...and keeps serving other jobs.
            ok = client.wait(client.submit(prompt="a healthy job", steps=2), timeout=60)
            assert ok["status"] == Status.SUCCEEDED
        finally:
            worker.stop()


def test_heartbeats_show_live_workers_and_drop_dead_ones(
    private_redis: RedisServer, models_dir: Path, models_file: str, tmp_path: Path
) -> None:
    from producer.fleet import live_workers

    values = stack_values(private_redis.url, models_dir, models_file,
                          f"file://{tmp_path / 'store'}", worker_heartbeat_s=0.3)
    env = worker_env(values)
    stopped = Worker(env, tmp_path / "w1.log", ["tiny-sdxl"]).start()
    killed = Worker(env, tmp_path / "w2.log", ["tiny-sdxl"]).start()
    try:
        with Client(Settings(**values)) as client:
            r = client.store.redis
            pids = {w["pid"] for w in live_workers(r)}
            assert {stopped.proc.pid, killed.proc.pid} <= pids  # type: ignore[union-attr]
            record = client.wait(client.submit(prompt="counted", steps=2), timeout=60)
            assert record["status"] == Status.SUCCEEDED
            time.sleep(0.7)
            done = {w["pid"]: w["jobs_done"] for w in live_workers(r)}
            assert sum(done.values()) == 1
            stopped.stop()  # a clean exit removes its heartbeat at once
            assert stopped.proc.pid not in {w["pid"] for w in live_workers(r)}  # type: ignore[union-attr]
            killed.kill()  # a dead one's heartbeat expires after three periods
            time.sleep(1.2)
            assert live_workers(r) == []
    finally:
        stopped.stop()
        killed.stop()
