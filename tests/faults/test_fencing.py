"""A run that outlives its lease (case 9), a run that outlives its visibility timeout
(the backstop, and the double failure it used to allow), and a healthy run that
outlives both many times over.

A frozen worker (SIGSTOP: a stalled GPU, a long GC or VM pause; alive but silent)
stops renewing its leases with its heartbeat. The reconciler takes the job back and
another worker runs it; the fence lets one run, and only one, produce the outcome.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any

import pytest
from redis import Redis

from producer.core import keys as K
from producer.core.contract import EventType, Status
from tests.helpers import (
    Rig,
    assert_one_outcome,
    finished_after,
    manifest,
    stored_files,
    wait_for_event,
    wait_until,
)
from tests.servers import Process

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def delivery_tag(r: Redis, job_id: str) -> str:
    """The delivery tag the job's record holds (its message's current one)."""
    tag = r.hget(K.job_key(job_id), "tag")
    assert isinstance(tag, bytes), tag
    return tag.decode()


FENCED = r"job \w+: fenced during (generation|post-processing)"


def _wait_log(worker: Process, pattern: str, timeout: float = 20) -> None:
    wait_until(
        lambda: re.search(pattern, worker.log()),
        timeout,
        interval=0.1,
        message=lambda: f"{pattern!r} in the worker's log:\n{worker.log()[-3000:]}",
    )


@pytest.mark.timeout(120)
def test_a_run_frozen_past_its_lease_is_taken_over_and_writes_nothing(rig: Rig) -> None:
    """Case 9, default settings: the job is taken over within seconds; thawed, the stale
    run writes nothing and acknowledges nothing the new run needs."""
    workers = [rig.worker(["sim-slow"], wait=False) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    client = rig.client()
    r = client.store.redis
    job_id = client.submit(prompt="outlives its lease", model="sim-slow")
    wait_for_event(client, job_id, EventType.PROGRESS)
    first_run = client.get(job_id)
    stale = rig.worker_of(first_run, workers)
    [second] = [w for w in workers if w is not stale]
    first_tag = delivery_tag(r, job_id)
    stale.signal(signal.SIGSTOP)
    frozen_at = time.time()
    try:
        # The lease runs out (3 heartbeats), the reconciler takes the job back and the
        # other worker starts it.
        retry = wait_for_event(client, job_id, EventType.RETRYING, timeout=40)
        assert retry["data"] == {
            "attempt": 2,
            "reason": "worker_lost",
            **({"metadata": retry["data"]["metadata"]} if "metadata" in retry["data"] else {}),
        }
        wait_for_event(client, job_id, EventType.STARTED, after=retry["id"], timeout=20)
        new_tag = delivery_tag(r, job_id)
        assert new_tag != first_tag  # restored under a fresh delivery tag
    finally:
        stale.signal(signal.SIGCONT)
    # The stale run wakes mid-denoise: its next write is refused, it stops, and its
    # task acknowledges its own (old) tag, which is not the one the new run holds.
    _wait_log(stale, FENCED)
    time.sleep(0.5)
    assert client.get(job_id)["status"] == Status.RUNNING  # the new run is still going
    assert r.hexists(K.UNACKED, new_tag), "the stale run removed the new run's message"
    assert not r.hexists(K.UNACKED, first_tag)

    record = client.wait(job_id, timeout=30)
    assert record["status"] == Status.SUCCEEDED, record
    assert record["attempts"] == 2
    assert str(record["worker"]).endswith(f":{second.pid}")
    assert finished_after(record, frozen_at) <= 30 + 3  # recovery bound + the job itself
    time.sleep(1.0)
    assert client.get(job_id) == record  # the terminal record never changed
    log = assert_one_outcome(rig, client, job_id)
    starts = [e for e in log if e["type"] == EventType.STARTED]
    assert [e["data"]["worker"] for e in starts] == [first_run["worker"], record["worker"]]
    assert [e["type"] for e in log].count(EventType.RETRYING) == 1
    assert rig.terminal_counts() == {job_id: 1}
    assert stored_files(rig.out, job_id) == ["0.png", "manifest.json"]
    assert manifest(rig.out, job_id)["worker"] == record["worker"]
    assert stale.proc is not None and stale.proc.poll() is None  # alive, serving on
    assert r.zcard(K.LEASES) == 0 and r.hlen(K.UNACKED) == 0


@pytest.mark.timeout(120)
def test_a_stale_ack_past_the_visibility_timeout_then_a_second_loss(rig: Rig) -> None:
    """The double failure that "Not promised" used to list: a run frozen past the
    visibility timeout (set short: this case is about that backstop), taken over,
    thawed (it acknowledges its message), and then the worker that took over is
    killed too. The job still ends, once, within the recovery bound of the kill."""
    values: dict[str, Any] = {"visibility_timeout_s": 4}
    workers = [rig.worker(["sim-slow"], wait=False, **values) for _ in range(3)]
    for w in workers:
        w.wait_ready()
    client = rig.client(**values)
    job_id = client.submit(prompt="two losses", model="sim-slow")
    wait_for_event(client, job_id, EventType.PROGRESS)
    stale = rig.worker_of(client.get(job_id), workers)
    stale.signal(signal.SIGSTOP)
    try:
        retry = wait_for_event(client, job_id, EventType.RETRYING, timeout=40)
        wait_for_event(client, job_id, EventType.PROGRESS, after=retry["id"], timeout=20)
    finally:
        stale.signal(signal.SIGCONT)
    _wait_log(stale, FENCED)  # fenced; its task acknowledged its message
    taker = rig.worker_of(client.get(job_id), workers)
    assert taker is not stale
    taker.kill()
    killed_at = time.time()
    record = client.wait(job_id, timeout=60)
    assert record["status"] == Status.SUCCEEDED, record
    assert record["attempts"] == 3
    assert finished_after(record, killed_at) <= 30 + 3
    log = assert_one_outcome(rig, client, job_id)
    assert [e["type"] for e in log].count(EventType.STARTED) == 3
    assert rig.terminal_counts() == {job_id: 1}
    assert stored_files(rig.out, job_id) == ["0.png", "manifest.json"]


@pytest.mark.timeout(90)
def test_a_healthy_job_ten_leases_long_runs_once(rig: Rig) -> None:
    """A job that runs ten times its lease, under the default visibility timeout, is
    never taken back nor delivered twice: its worker's heartbeat renews the lease. (The
    heartbeat is shortened here, so that ten leases fit in a test: this case is about
    the lease's length.)"""
    rig.base["models_file"] = str(rig.tmp / "long.toml")
    (rig.tmp / "long.toml").write_text(
        (rig.tmp / "models.toml").read_text()
        + """
[models."sim-long"]
pipeline = "simulated"
source = "builtin:simulated"
gpu_ms = 10000
steps = 40
width = 64
height = 64
max_side = 512
max_pixels = 262144
"""
    )
    values: dict[str, Any] = {"worker_heartbeat_s": 0.3, "reconcile_interval_s": 1}
    settings = rig.settings(**values)
    assert 10 >= 10 * settings.lease_ttl_s
    workers = [rig.worker(["sim-long"], wait=False, **values) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    client = rig.client(**values)
    job_id = client.submit(prompt="ten leases long", model="sim-long")
    record = client.wait(job_id, timeout=60)
    assert record["status"] == Status.SUCCEEDED, record
    assert record["attempts"] == 1
    log = assert_one_outcome(rig, client, job_id)
    types = [e["type"] for e in log]
    assert types.count(EventType.STARTED) == 1 and EventType.RETRYING not in types
    logs = "".join(w.log() for w in workers)
    # One delivery of its message in the whole fleet, and nothing reconciled.
    assert logs.count(f"atelier.generate[{job_id}] received") == 1, logs[-3000:]
    assert "lease of worker" not in logs and "duplicate message dropped" not in logs
