"""Workers killed mid-job (cases 1, 2, 6) and stopped for scale-in (case 7).

The worker is one process running Celery's threads pool (``python -m worker``; ``atelier
worker`` execs it), so there is no prefork pool child whose death its parent could
see. A SIGKILL is therefore always the death of everything the worker held: case 1
kills the worker process alone (as the kernel's OOM killer picks one process) and its
whole process group (as ``docker kill``, a pod eviction or a lost node end every
process of the worker at once). Either way the jobs' leases run out with the worker's
heartbeat and the reconciler puts their messages back within seconds; the attempt
count and fence keep the outcome single.

Every case runs with the default visibility timeout (a day), heartbeat (5 s) and
reconciler interval (5 s): what a user has. Only the lease case, which is about the
lease's length, shortens the heartbeat.
"""

from __future__ import annotations

import random
import signal
import time
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from producer.core.contract import EventType, Status
from producer.jobs.broker import queue_depth
from tests.helpers import (
    WEBHOOK_SECRET,
    Rig,
    assert_one_outcome,
    finished_after,
    manifest,
    stored_files,
    wait_for_event,
    wait_until,
)
from tests.receiver import Receiver

#: The promise: a lost worker's jobs end this soon after it died (default settings).
RECOVERY_S = 30

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("target", ["process", "process-group"])
def test_worker_killed_mid_denoise_runs_again_once(rig: Rig, target: str) -> None:
    """Case 1: one set of objects, one terminal event, one completed webhook id."""
    with Receiver() as receiver:
        values: dict[str, Any] = {
            "webhook_secret": WEBHOOK_SECRET,
            "webhook_retry_schedule_s": "0.3,0.3,0.3",
        }
        workers = [
            rig.worker(["tiny-sdxl"], wait=False, new_session=True, **values) for _ in range(2)
        ]
        for w in workers:
            w.wait_ready()
        rig.dispatcher(**values)
        client = rig.client(**values)
        job_id = client.submit(
            prompt="killed mid-denoise", model="tiny-sdxl", steps=30, webhook=receiver.url("/done")
        )
        wait_for_event(client, job_id, EventType.PROGRESS)
        victim = rig.worker_of(client.get(job_id), workers)
        [survivor] = [w for w in workers if w is not victim]
        if target == "process":
            victim.kill()
        else:
            victim.kill_group()
        killed_at = time.time()
        assert client.get(job_id)["status"] == Status.RUNNING  # it died without a word

        record = client.wait(job_id, timeout=60)
        assert record["status"] == Status.SUCCEEDED, record
        assert finished_after(record, killed_at) <= RECOVERY_S, record["finished_at"]
        assert record["attempts"] == 2
        assert str(record["worker"]).endswith(f":{survivor.pid}")
        log = assert_one_outcome(rig, client, job_id)
        types = [e["type"] for e in log]
        assert types.count(EventType.STARTED) == 2 and types.count(EventType.RETRYING) == 1
        # One set of objects: the deterministic keys, nothing half-written beside them.
        assert stored_files(rig.out, job_id) == ["0.png", "manifest.json"]
        m = manifest(rig.out, job_id)
        assert m["attempt"] == 2 and m["outputs"] == [
            {k: v for k, v in o.items() if k != "url"} for o in record["outputs"]
        ]
        # One completed webhook id: the terminal event's.
        [got] = receiver.wait_for("/done", 1)
        Webhook(WEBHOOK_SECRET).verify(got.body, got.headers)
        assert got.headers["webhook-id"] == log[-1]["id"]
        time.sleep(1.0)
        assert {r.headers["webhook-id"] for r in receiver.at("/done")} == {log[-1]["id"]}


@pytest.mark.timeout(150)
def test_fifty_jobs_survive_three_random_kills(rig: Rig) -> None:
    """Case 2: 50 jobs on 2 workers, 3 SIGKILLs at random moments, each killed worker
    replaced (as an orchestrator would): all 50 succeed, one terminal event each."""
    rng = random.Random(4)
    values: dict[str, Any] = {"max_attempts": 5}
    workers = [rig.worker(wait=False, **values) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    client = rig.client(**values)
    # 150 ms each: 50 jobs outlast the kills (a replaced worker takes seconds to start).
    jobs = [client.submit(prompt=f"job {i}", seed=i, model="sim") for i in range(50)]
    kills: list[int] = []
    held: dict[str, float] = {}  # job held by a victim -> when it was killed
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 1.5))
        live = [w for w in workers if w.proc is not None and w.proc.poll() is None]
        victim = rng.choice(live)
        victim.kill()
        killed_at = time.time()
        held.update(dict.fromkeys(rig.leased_to(victim), killed_at))
        kills.append(victim.pid)
        workers.remove(victim)
        workers.append(rig.worker(wait=False, **values))
    records = rig.wait_terminal(client, jobs, timeout=120)
    bad = {
        j: (r["status"], r["error"]) for j, r in records.items() if r["status"] != Status.SUCCEEDED
    }
    assert not bad, bad
    counts = rig.terminal_counts()
    assert all(counts[j] == 1 for j in jobs), {j: counts[j] for j in jobs if counts[j] != 1}
    assert sum(counts.values()) == 50
    # The kills hit jobs mid-run (else this test proves nothing)...
    assert any(r["attempts"] > 1 for r in records.values()), kills
    assert held, kills
    # ...and every job a victim held ended soon after its kill, not an hour later.
    late = {
        j: round(finished_after(records[j], t), 1)
        for j, t in held.items()
        if finished_after(records[j], t) > RECOVERY_S
    }
    assert not late, late
    for j in jobs:
        assert stored_files(rig.out, j) == ["0.png", "manifest.json"]


@pytest.mark.timeout(120)
def test_poison_job_ends_worker_lost_and_the_worker_serves_on(rig: Rig) -> None:
    """Case 6: a job that kills its worker every time ends ``worker_lost`` after
    ``MAX_ATTEMPTS`` runs; the worker that sees it go on serves the others."""
    values: dict[str, Any] = {"max_attempts": 2, "worker_concurrency": 1}
    workers = [rig.worker(["sim", "sim-slow"], wait=False, **values) for _ in range(3)]
    for w in workers:
        w.wait_ready()
    client = rig.client(**values)
    poison = client.submit(prompt="kills its worker", model="sim-slow", priority=9)
    last = None
    for attempt in (1, 2):
        started = wait_for_event(client, poison, EventType.STARTED, after=last)
        last = wait_for_event(client, poison, EventType.PROGRESS, after=started["id"])["id"]
        doc = client.get(poison)
        assert doc["attempts"] == attempt
        victim = rig.worker_of(doc, workers)
        victim.kill()  # SIGKILL mid-denoise: no ack, no word
        workers.remove(victim)
    assert client.get(poison)["status"] == Status.RUNNING
    healthy = [client.submit(prompt=f"healthy {i}") for i in range(3)]

    # The second lease runs out: the reconciler sees two lost attempts and ends the
    # job instead of running it again...
    [worker] = workers
    record = client.wait(poison, timeout=60)
    assert record["status"] == Status.FAILED, record
    assert record["error"] and record["error"]["code"] == "worker_lost"
    assert record["attempts"] == 2
    log = assert_one_outcome(rig, client, poison)
    types = [e["type"] for e in log]
    assert types.count(EventType.STARTED) == 2
    assert types.count(EventType.RETRYING) == 1
    # ...and serves the other jobs, queued behind it, and new ones.
    healthy.append(client.submit(prompt="after the poison"))
    for jid in healthy:
        done = client.wait(jid, timeout=60)
        assert done["status"] == Status.SUCCEEDED, done
        assert str(done["worker"]).endswith(f":{worker.pid}")
    assert worker.proc is not None and worker.proc.poll() is None


@pytest.mark.timeout(90)
def test_sigterm_finishes_the_running_job_and_gives_back_the_held_one(rig: Rig) -> None:
    """Case 7: at scale-in the worker finishes its running job, hands the job it held
    but had not started back to the queue at once (not after the visibility timeout),
    takes no new one, and exits 0."""
    # The default visibility timeout (a day) and lease (15 s): only an explicit
    # give-back can bring the held message to another worker within 3 s.
    values: dict[str, Any] = {"worker_concurrency": 2}
    first = rig.worker(["sim-mid"], **values)
    client = rig.client(**values)
    running = client.submit(prompt="running at SIGTERM", model="sim-mid")
    held = client.submit(prompt="held at SIGTERM", model="sim-mid")
    waiting = client.submit(prompt="still in the queue", model="sim-mid")
    wait_for_event(client, running, EventType.PROGRESS)
    broker = client.store.redis
    # the second slot took `held`
    wait_until(
        lambda: queue_depth(broker, "sim-mid") == 1,
        10,
        interval=0.02,
        message=lambda: f"one message left in the queue; {queue_depth(broker, 'sim-mid')} are",
    )
    assert client.get(held)["status"] == Status.QUEUED  # waiting for the GPU

    first.signal(signal.SIGTERM)
    second = rig.worker(["sim-mid"], wait=False, **values)  # the fleet's other worker
    # given back at once
    wait_until(
        lambda: queue_depth(broker, "sim-mid") == 2,
        3,
        interval=0.02,
        message="the held message comes back to the queue",
    )
    assert first.proc is not None
    assert first.proc.wait(30) == 0
    done = client.get(running)
    assert done["status"] == Status.SUCCEEDED and done["attempts"] == 1, done
    assert str(done["worker"]).endswith(f":{first.pid}")
    assert "not started before shutdown; requeued" in first.log()

    second.wait_ready()
    for jid in (held, waiting):
        rec = client.wait(jid, timeout=30)
        # Run once, by the other worker: the first never started it.
        assert rec["status"] == Status.SUCCEEDED and rec["attempts"] == 1, rec
        assert str(rec["worker"]).endswith(f":{second.pid}")
    for jid in (running, held, waiting):
        log = assert_one_outcome(rig, client, jid)
        assert len([e for e in log if e["type"] == EventType.STARTED]) == 1


@pytest.mark.timeout(90)
def test_heartbeats_show_live_workers_and_drop_dead_ones(rig: Rig) -> None:
    from producer.jobs.fleet import live_workers

    values: dict[str, Any] = {"worker_heartbeat_s": 0.3}
    stopped = rig.worker(wait=False, **values)
    killed = rig.worker(wait=False, **values)
    stopped.wait_ready()
    killed.wait_ready()
    client = rig.client(**values)
    r = client.store.redis
    pids = {w["pid"] for w in live_workers(r)}
    assert {stopped.pid, killed.pid} <= pids
    record = client.wait(client.submit(prompt="counted"), timeout=60)
    assert record["status"] == Status.SUCCEEDED
    time.sleep(0.7)
    done = {w["pid"]: w["jobs_done"] for w in live_workers(r)}
    assert sum(done.values()) == 1
    stopped.stop()  # a clean exit removes its heartbeat at once
    assert stopped.pid not in {w["pid"] for w in live_workers(r)}
    killed.kill()  # a dead one's heartbeat expires after three periods
    time.sleep(1.2)
    assert live_workers(r) == []
