"""The GPU never waits: job N+1 generates while job N is encoded and uploaded.

Two real workers on a simulated GPU (``pipeline = "simulated"``: 200 ms of sleep per
image, 512² pictures that cost ~80 ms to encode as PNG), uploading to moto's S3 server:
one as shipped, one with ``ATELIER_OVERLAP_POSTPROCESS=false``. The assertions are
about order (event ids from one Redis stream, fixed by the server), never durations.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from producer import Client
from producer.core.contract import EventType, Record, Status, parse_iso
from producer.core.settings import Settings
from tests.helpers import BUCKET, stack_values, wait_until, worker_env
from tests.servers import RedisServer, S3Server, Worker

pytestmark = pytest.mark.slow

SIMULATED = """
pipeline = "simulated"
source = "builtin:simulated"
gpu_ms = 200
steps = 4
width = 512
height = 512
"""
MODELS = "".join(f'[models."{name}"]{SIMULATED}\n' for name in ("sim-overlap", "sim-inline"))


def eid(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


@pytest.fixture(scope="module")
def workers(
    session_dir: Path, redis_server: RedisServer, s3_server: S3Server, models_dir: Path
) -> Iterator[dict[str, Any]]:
    models_file = session_dir / "overlap-models.toml"
    models_file.write_text(MODELS)
    values = stack_values(
        redis_server.url, models_dir, str(models_file), f"s3://{BUCKET}/overlap", s3_server.endpoint
    )
    overlap = Worker(worker_env(values), session_dir / "logs" / "overlap.log", ["sim-overlap"])
    inline = Worker(
        worker_env({**values, "overlap_postprocess": "false"}),
        session_dir / "logs" / "inline.log",
        ["sim-inline"],
    )
    overlap.start(wait=False)
    inline.start(wait=False)
    try:
        overlap.wait_ready()
        inline.wait_ready()
        yield {"settings": Settings(**values), "overlap": overlap, "inline": inline}
    finally:
        overlap.stop()
        inline.stop()


def run_three(
    settings: Settings,
    model: str,
    watch_unacked: bool = False,
) -> tuple[list[Record], dict[str, dict[str, str]], list[bool]]:
    """Three jobs at once; their records, the first event id of each type, and what
    was seen of their messages while they were being post-processed."""
    with Client(settings) as client:
        ids = [client.submit(prompt=f"job {i}", model=model, seed=i) for i in range(3)]
        held: list[bool] = []
        if watch_unacked:
            held = watch_post_processing(client, ids)
        records = [client.wait(job_id, timeout=60) for job_id in ids]
        events: dict[str, dict[str, str]] = {job_id: {} for job_id in ids}
        for job_id in ids:
            for e in client.store.events(job_id):
                events[job_id].setdefault(e["type"], e["id"])
    return records, events, held


def watch_post_processing(client: Client, ids: list[str]) -> list[bool]:
    """While a job is past its generation (another job has started) but not yet
    succeeded, is its Celery message still unacknowledged? One bool per sighting."""
    seen: list[bool] = []
    done: set[str] = set()

    def look() -> bool:
        """One sighting of every job not yet terminal; true once all are."""
        started = [
            j for j in ids if any(e["type"] == EventType.STARTED for e in client.store.events(j))
        ]
        raw: Any = client.store.redis.hvals("unacked")  # bytes (decode_responses off)
        unacked = b"".join(raw)
        for job_id in ids:
            if job_id in done:
                continue
            status = client.store.load(job_id).status
            if status.is_terminal():
                done.add(job_id)
                continue
            others = [j for j in started if j != job_id]
            if status is Status.RUNNING and others and job_id.encode() in unacked:
                seen.append(True)
            elif status is Status.RUNNING and others:
                # Recheck: the status may have changed since the hash was read.
                if not client.store.load(job_id).status.is_terminal():
                    seen.append(False)
        return len(done) == len(ids)

    wait_until(look, 30, interval=0.005, message="the three jobs end")
    return seen


def test_next_job_generates_while_the_previous_is_post_processed(workers: dict[str, Any]) -> None:
    records, events, held = run_three(workers["settings"], "sim-overlap", watch_unacked=True)
    assert all(r["status"] == Status.SUCCEEDED for r in records), records
    order = sorted(events, key=lambda j: eid(events[j][EventType.STARTED]))
    for prev, nxt in pairwise(order):
        # Job N+1 took the GPU before job N's outputs were stored and it succeeded…
        assert eid(events[nxt][EventType.STARTED]) < eid(events[prev][EventType.OUTPUT])
        assert eid(events[nxt][EventType.STARTED]) < eid(events[prev][EventType.SUCCEEDED])
    by_id = {r["id"]: r for r in records}
    for prev, nxt in pairwise(order):
        # …but only after job N's generation ended: one generation at a time.
        a, b = by_id[prev], by_id[nxt]
        a_end = parse_iso(str(a["started_at"])).timestamp() * 1000 + a["timings"]["inference_ms"]
        assert parse_iso(str(b["started_at"])).timestamp() * 1000 >= a_end - 2  # ms rounding
    # At-least-once: a job's message stays unacknowledged while it is post-processed.
    assert held and all(held), held


def test_inline_post_processing_holds_the_gpu(workers: dict[str, Any]) -> None:
    records, events, _ = run_three(workers["settings"], "sim-inline")
    assert all(r["status"] == Status.SUCCEEDED for r in records), records
    order = sorted(events, key=lambda j: eid(events[j][EventType.STARTED]))
    for prev, nxt in pairwise(order):
        assert eid(events[prev][EventType.SUCCEEDED]) < eid(events[nxt][EventType.STARTED])
