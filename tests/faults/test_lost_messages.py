"""Messages the broker lost (the reconciler's second duty): a queued job whose message
was deleted from its list (reconciled by the dispatcher alone, the workers scaled to
zero), and a broker Redis (separate from the job store) that lost every key. The jobs
still run, once, with the default settings (the first case shortens the one timeout it is
about, the reconcile grace)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from producer import Client
from producer.core import keys as K
from producer.core.contract import EventType, Record, Status
from producer.core.settings import Settings
from tests.helpers import (
    MODELS,
    Rig,
    assert_one_outcome,
    stack_values,
    wait_until,
    worker_env,
)
from tests.servers import RedisServer, Worker

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.mark.timeout(120)
def test_a_queued_jobs_deleted_message_is_republished(rig: Rig) -> None:
    """Workers scaled to zero, only a dispatcher running; a queued job's message is
    deleted from the broker's list (what kombu's BRPOP window, or a flushed key, leaves).
    Past the reconcile grace the dispatcher's reconciler re-publishes it, so the queue's
    depth shows the job again (what KEDA scales on), and the worker that then starts
    runs it once. The case is about ``RECONCILE_GRACE_S``: it runs at 10 s, not the
    default 30, and asserts the re-publish lands in the window that setting opens."""
    from producer.jobs.broker import queue_depth

    grace = {"reconcile_grace_s": 10}
    dispatcher = rig.dispatcher(webhook_secret="whsec_" + "A" * 43 + "=", **grace)
    client = rig.client()
    r = client.store.redis
    job_id = client.submit(prompt="lost message", model="sim")
    other = client.submit(prompt="kept message", model="sim")
    [key] = [k for k in K.queue_keys("sim") if r.llen(k)]
    for raw in r.lrange(key, 0, -1):
        if json.loads(raw)["headers"]["id"] == job_id:
            assert r.lrem(key, 1, raw) == 1  # type: ignore[arg-type]  # redis-py: value is str; bytes work
    assert queue_depth(r, "sim") == 1  # only the other job's message is left
    submitted = time.time()
    settings = rig.settings(**grace)
    wait_until(
        lambda: queue_depth(r, "sim") == 2,
        settings.reconcile_grace_s + 20,
        interval=0.2,
        message=lambda: (
            f"the lost message republished; the dispatcher's log:\n{dispatcher.log()[-2000:]}"
        ),
    )
    # Not before the grace (the message could have been in a worker's hands), and not
    # much after it.
    waited = time.time() - submitted
    assert settings.reconcile_grace_s <= waited <= settings.reconcile_grace_s + 15, waited
    assert f"job {job_id}: queued waiting with its message in no queue" in dispatcher.log()
    rig.worker()
    record = client.wait(job_id, timeout=60)
    assert record["status"] == Status.SUCCEEDED, record
    assert record["attempts"] == 1
    assert client.wait(other, timeout=10)["status"] == Status.SUCCEEDED
    log = assert_one_outcome(rig, client, job_id)
    assert [e["type"] for e in log].count(EventType.STARTED) == 1
    assert rig.terminal_counts() == {job_id: 1, other: 1}


def restart_empty(broker: RedisServer, client: Client, jobs: list[str]) -> None:
    """Kill the broker with jobs running, held and queued; it keeps nothing on disk (no
    AOF, no snapshots), so it comes back empty."""
    broker.stop(signal.SIGKILL)
    states = [client.get(j)["status"] for j in jobs]
    assert Status.QUEUED in states and Status.RUNNING in states, states
    time.sleep(1.0)
    broker.start()


def every_job_succeeded_once(client: Client, jobs: list[str]) -> None:
    def all_terminal() -> list[Record] | None:
        records = [client.get(j) for j in jobs]
        return records if all(Status(r["status"]).is_terminal() for r in records) else None

    records = wait_until(
        all_terminal,
        120,
        interval=0.2,
        message=lambda: f"every job terminal: {[client.get(j)['status'] for j in jobs]}",
    )
    assert [r["status"] for r in records] == [Status.SUCCEEDED] * len(jobs), [
        (r["status"], r["error"]) for r in records
    ]
    for j in jobs:
        log = client.store.events(j, count=10_000)
        terminal = [e for e in log if e["type"] == EventType.SUCCEEDED]
        assert len(terminal) == 1 and log[-1] is terminal[0]


@pytest.mark.timeout(180)
def test_a_broker_that_lost_its_data(
    two_redis: tuple[RedisServer, RedisServer], models_dir: Path, tmp_path: Path
) -> None:
    """Broker and job store as two redis-servers. The broker's process is SIGKILLed and
    restarted empty while jobs run and wait: every job that was queued
    or running still ends ``succeeded``, once."""
    broker, store = two_redis
    sims = tmp_path / "models.toml"
    sims.write_text(MODELS)
    values = stack_values(
        store.url,
        models_dir,
        str(sims),
        f"file://{tmp_path / 'out'}",
        broker_url=broker.url,
        rate_limit_per_s=0,
    )
    procs: list = []
    try:
        workers = [
            Worker(worker_env(values), tmp_path / f"worker{i}.log", ["sim-mid"]) for i in range(2)
        ]
        procs += workers
        for w in workers:
            w.start(wait=False)
        for w in workers:
            w.wait_ready()
        with Client(Settings(**values)) as client:
            jobs = [client.submit(prompt=f"job {i}", model="sim-mid", seed=i) for i in range(12)]
            wait_until(
                lambda: sum(client.get(j)["status"] == Status.RUNNING for j in jobs) >= 2,
                30,
                interval=0.05,
                message="two jobs running",
            )
            restart_empty(broker, client, jobs)
            every_job_succeeded_once(client, jobs)
            logs = "".join(w.log() for w in workers)
            assert "waiting with its message in no queue" in logs
    finally:
        for p in reversed(procs):
            p.stop()
