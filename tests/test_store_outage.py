"""The job store goes away mid-job: the job is requeued, not lost, and ends once."""

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
def two_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    broker = RedisServer(tmp_path / "broker").start()
    store = RedisServer(tmp_path / "store", appendonly=True).start()
    yield broker, store
    store.stop()
    broker.stop()


def test_store_outage_requeues_the_job(two_redis: tuple[RedisServer, RedisServer],
                                       models_dir: Path, models_file: str,
                                       tmp_path: Path) -> None:
    broker, store = two_redis
    values = stack_values(store.url, models_dir, models_file, f"file://{tmp_path / 'out'}",
                          broker_url=broker.url, worker_concurrency=1)
    worker = Worker(worker_env(values), tmp_path / "worker.log", ["tiny-sdxl"]).start()
    try:
        with Client(Settings(**values)) as client:
            job_id = client.submit(prompt="through an outage", steps=60)
            for ev in client.events(job_id, timeout=60):
                if ev["type"] == EventType.PROGRESS:
                    break
            store.stop()  # SIGTERM: Redis writes its AOF and exits
        deadline = time.monotonic() + 30
        while "job store unreachable" not in worker.log():
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.2)
        store.start()  # same port, same AOF: the record is back
        with Client(Settings(**values)) as client:
            record = client.wait(job_id, timeout=90)
            events = list(client.events(job_id, timeout=5))
        assert record["status"] == Status.SUCCEEDED, record
        assert record["attempts"] == 2  # the requeued message ran it again
        types = [e["type"] for e in events]
        assert types.count(EventType.SUCCEEDED) == 1
        assert types[-1] == EventType.SUCCEEDED
        assert (tmp_path / "out" / job_id / "0.png").exists()
    finally:
        worker.stop()
