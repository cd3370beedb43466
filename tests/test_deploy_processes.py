"""What the deploy files rely on, against a real redis-server and a real worker: the Redis
lists KEDA's ScaledObjects scale on hold exactly the queued jobs, and SIGTERM (compose
stop, a pod's termination) lets the running job finish within the grace period."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.core import keys as K
from producer.core.settings import Settings
from producer.jobs.broker import queue_depth
from tests.deploy_files import scaled_object_lists
from tests.helpers import wait_until, worker_env
from tests.servers import RedisServer, Worker

KEDA_MODEL = "playground-v2.5"
# The example model's name with tiny weights: a worker that serves the very queue the
# manifest names, on the CPU.
TINY_AS_KEDA_MODEL = f"""
[models."{KEDA_MODEL}"]
source = "builtin:tiny-sdxl"
dtype = "fp32"
scheduler = "euler"
schedulers = ["euler"]
steps = 2
guidance_scale = 5.0
width = 64
height = 64
max_side = 512
max_pixels = 262144
"""


@pytest.fixture
def keda_stack(tmp_path: Path, models_dir: Path) -> Iterator[tuple[RedisServer, dict[str, Any]]]:
    """A private Redis, and settings for a worker serving the example model's queue."""
    models_file = tmp_path / "models.toml"
    models_file.write_text(TINY_AS_KEDA_MODEL)
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield (
            server,
            {
                "redis_url": server.url,
                "storage_url": f"file://{tmp_path / 'out'}",
                "models_file": str(models_file),
                "models_dir": str(models_dir),
                "default_model": KEDA_MODEL,
                "device": "cpu",
                "torch_threads": 1,
            },
        )
    finally:
        server.stop()


@pytest.mark.slow
def test_keda_lists_hold_exactly_the_queued_jobs(
    tmp_path: Path, keda_stack: tuple[RedisServer, dict[str, Any]]
) -> None:
    lists = scaled_object_lists(KEDA_MODEL)
    server, base = keda_stack
    worker = None
    try:
        values = {**base, "job_timeout_s": 60, "restore_interval_s": 1}
        settings = Settings(**values)
        r = redis.Redis.from_url(server.url)

        def lengths() -> list[int]:
            return [int(r.llen(k)) for k in lists]

        from producer import Client

        priorities = [p % 10 for p in range(23)]  # every priority, some twice or thrice
        with Client(settings) as client:
            ids = [
                client.submit(prompt=f"job {i}", priority=p, seed=i)
                for i, p in enumerate(priorities)
            ]
            # No worker yet: every job waits in exactly one of the lists KEDA reads, the
            # one of its priority (list i holds atelier priority 9 - i).
            assert sum(lengths()) == len(ids) == queue_depth(r, KEDA_MODEL)
            assert lengths() == [priorities.count(9 - i) for i in range(10)]
            # Nothing else of the model's queue is anywhere else KEDA does not look.
            keys: Any = r.keys(f"{K.queue_name(KEDA_MODEL)}*")
            assert not [k for k in keys if k.decode() not in lists]

            worker = Worker(worker_env(values), tmp_path / "worker.log", [KEDA_MODEL])
            worker.start()
            samples = [sum(lengths())]

            def drained() -> bool:
                samples.append(sum(lengths()))
                return samples[-1] == 0

            if samples[-1]:
                wait_until(drained, 180, interval=0.1, message=lambda: f"{samples[-20:]} drain")
            # Taken messages leave the lists (they sit in kombu's unacked hash while the
            # job runs): the sum drains to zero, never rising, as the worker takes them.
            assert samples[-1] == 0, samples[-20:]
            assert all(a >= b for a, b in itertools.pairwise(samples))
            records = [client.wait(i, timeout=180) for i in ids]
        assert {rec["status"] for rec in records} == {"succeeded"}
        assert sum(lengths()) == 0 == queue_depth(r, KEDA_MODEL)
    finally:
        if worker is not None:
            worker.stop()


@pytest.mark.slow
def test_sigterm_lets_the_running_job_finish(
    tmp_path: Path, keda_stack: tuple[RedisServer, dict[str, Any]]
) -> None:
    """What the grace periods rely on: SIGTERM (compose stop, a pod's termination) lets
    the job a worker is running finish and be stored, takes no new one, and exits."""
    server, base = keda_stack
    worker = None
    try:
        values = {**base, "job_timeout_s": 120, "worker_concurrency": 1, "progress_interval_s": 0.1}
        settings = Settings(**values)
        worker = Worker(worker_env(values), tmp_path / "worker.log", [KEDA_MODEL])
        worker.start()
        from producer import Client

        with Client(settings) as client:
            long_job = client.submit(prompt="a long one", steps=60, seed=1)
            waiting = client.submit(prompt="waits its turn", steps=2, seed=2)
            for event in client.events(long_job):
                if event["type"] == "job.progress":  # generating now
                    break
            assert worker.proc is not None
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.proc.wait(timeout=120) == 0
            done = client.get(long_job)
            assert done["status"] == "succeeded" and done["attempts"] == 1
            assert Path(tmp_path / "out" / str(done["outputs"][0]["key"])).is_file()
            # The job it had not taken is still queued, in the lists KEDA reads.
            assert client.get(waiting)["status"] == "queued"
            r = redis.Redis.from_url(server.url)
            assert queue_depth(r, KEDA_MODEL) == 1
            assert sum(int(r.llen(k)) for k in scaled_object_lists(KEDA_MODEL)) == 1
        assert "Warm shutdown" in worker.log()
    finally:
        if worker is not None:
            worker.stop()
