"""Redis restarted under load (case 3), and a separate job store that goes away
mid-job: every accepted job ends terminal, once, and no process needs a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from producer import Client
from producer.core.contract import EventType, Record, Status
from producer.core.settings import Settings
from tests.faults.submitter import Submitter
from tests.helpers import (
    MODELS,
    WEBHOOK_SECRET,
    Rig,
    stack_values,
    wait_until,
    worker_env,
)
from tests.receiver import Receiver
from tests.servers import Process, RedisServer, Worker

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def sse_types(port: int, job_id: str) -> list[str]:
    """The event types of a job's whole SSE stream, read through the API."""
    import httpx

    types = []
    with httpx.stream(
        "GET",
        f"http://127.0.0.1:{port}/v1/jobs/{job_id}/events",
        headers={"Authorization": "Bearer fault-key"},
        timeout=30,
    ) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("event: "):
                types.append(line.removeprefix("event: "))
    return types


def restart_redis_mid_load(rig: Rig, port: int, submitter: Submitter) -> tuple[dict[str, str], int]:
    """Redis restarted once 20 of the 50 jobs are accepted; the submitter goes on through
    it: (every idempotency key's job, how many were accepted before the restart)."""

    def twenty_accepted() -> bool:
        enough = submitter.accepted_count() >= 20
        assert enough or submitter.is_alive(), submitter.error
        return enough

    wait_until(
        twenty_accepted,
        60,
        interval=0.02,
        message=lambda: f"20 jobs accepted; {submitter.accepted_count()} are",
    )
    before = submitter.accepted_count()
    # An event stream read before the restart leaves the API's asyncio Redis pool a
    # connection that the restart breaks; one read after it must reconnect.
    assert sse_types(port, submitter.accepted["fault-0"])[-1] == EventType.SUCCEEDED
    rig.redis.stop()  # SIGTERM: Redis fsyncs its AOF and exits
    time.sleep(3.0)
    rig.redis.start()  # same port, same AOF
    accepted = submitter.finish(timeout=90)
    assert len(accepted) == 50
    assert before < 50  # the restart happened mid-load
    return accepted, before


def every_job_ran_once(
    rig: Rig, client: Client, submitter: Submitter, accepted: dict[str, str]
) -> dict[str, Record]:
    jobs = list(accepted.values())
    records = rig.wait_terminal(client, jobs, timeout=90)
    bad = {
        j: (r["status"], r["error"]) for j, r in records.items() if r["status"] != Status.SUCCEEDED
    }
    assert not bad, bad
    counts = rig.terminal_counts()
    assert {counts[j] for j in jobs} == {1}, {j: counts[j] for j in jobs if counts[j] != 1}
    assert client.store.redis.zcard("atelier:queued:sim") == 0  # nothing stuck queued
    # One key, one job, replays included.
    assert {(k, accepted[k]) for k, _ in submitter.answers} == set(submitter.answers)
    return records


def every_webhook_delivered(
    rig: Rig, client: Client, dispatcher: Process, receiver: Receiver, jobs: list[str]
) -> None:
    store = client.store

    def undelivered() -> list[str]:
        return [
            j for j in jobs if not any(d["outcome"] == "delivered" for d in store.deliveries(j))
        ]

    wait_until(
        lambda: not undelivered(),
        60,
        interval=0.2,
        message=lambda: (
            f"every webhook delivered; {len(undelivered())} are not; "
            f"the dispatcher's log:\n{dispatcher.log()[-2000:]}"
        ),
    )
    ids = {g.headers["webhook-id"] for g in receiver.at("/done")}
    terminal = {e["id"] for e in rig.events() if e["type"] == EventType.SUCCEEDED}
    assert ids == terminal


@pytest.mark.timeout(150)
def test_redis_restart_in_the_middle_of_fifty_jobs(rig: Rig) -> None:
    """Case 3: redis-server (AOF everysec, noeviction) restarted gracefully while 50
    jobs go through the API, two workers and a dispatcher. Every job that got a 202
    ends terminal, once, none stays queued, and every process carries on by itself."""
    # A message a worker had taken but not yet leased when Redis went down stays in
    # kombu's unacked set (the worker could not put it back while Redis was down): the
    # reconciler moves it back once it is older than the grace. The visibility timeout
    # is the default, a day: nothing here waits for it.
    values: dict[str, Any] = {
        "webhook_secret": WEBHOOK_SECRET,
        "webhook_retry_schedule_s": ",".join(["0.5"] * 20),
        "webhook_read_timeout_s": 2,
        "webhook_claim_idle_s": 3,
    }
    with Receiver() as receiver:
        workers = [rig.worker(wait=False, **values) for _ in range(2)]
        api = rig.api(**values)
        assert api.port is not None  # rig.api gives it one
        dispatcher = rig.dispatcher(**values)
        for w in workers:
            w.wait_ready()
        submitter = Submitter(
            [f"http://127.0.0.1:{api.port}"],
            50,
            {"prompt": "through a restart", "model": "sim", "webhook": receiver.url("/done")},
            pace_s=0.05,
        )
        submitter.start()
        accepted, before = restart_redis_mid_load(rig, api.port, submitter)

        client = rig.client(**values)
        records = every_job_ran_once(rig, client, submitter, accepted)
        # The same processes, reconnected: workers served jobs after the restart, the
        # API answers ready, the dispatcher delivered every completed event.
        for proc in [*workers, api, dispatcher]:
            assert proc.proc is not None and proc.proc.poll() is None, proc.log()[-2000:]
        late = [records[accepted[f"fault-{i}"]] for i in range(before + 5, 50)]
        pids = {w.pid for w in workers}
        assert all(int(str(r["worker"]).rsplit(":", 1)[1]) in pids for r in late)
        import httpx

        assert httpx.get(f"http://127.0.0.1:{api.port}/readyz").status_code == 200
        for key in ("fault-1", "fault-49"):
            assert sse_types(api.port, accepted[key])[-1] == EventType.SUCCEEDED
        every_webhook_delivered(rig, client, dispatcher, receiver, list(accepted.values()))


@pytest.mark.timeout(120)
def test_store_outage_requeues_the_job(
    two_redis: tuple[RedisServer, RedisServer], models_dir: Path, tmp_path: Path
) -> None:
    broker, store = two_redis
    sims = tmp_path / "models.toml"
    sims.write_text(MODELS)
    values = stack_values(
        store.url,
        models_dir,
        str(sims),
        f"file://{tmp_path / 'out'}",
        broker_url=broker.url,
        worker_concurrency=1,
    )
    worker = Worker(worker_env(values), tmp_path / "worker.log", ["sim-mid"]).start()
    try:
        with Client(Settings(**values)) as client:
            job_id = client.submit(prompt="through an outage", model="sim-mid")
            for ev in client.events(job_id, timeout=60):
                if ev["type"] == EventType.PROGRESS:
                    break
            store.stop()  # SIGTERM: Redis writes its AOF and exits
        wait_until(
            lambda: "job store unreachable" in worker.log(),
            30,
            interval=0.2,
            message=lambda: f"the worker finds the store gone:\n{worker.log()[-3000:]}",
        )
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
