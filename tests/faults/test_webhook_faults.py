"""Webhook receivers that fail or hang (case 5) and dispatchers killed mid-delivery
(case 8): every terminal event is delivered in the end, under its one ``webhook-id``."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from producer.core import keys as K
from producer.core.contract import TERMINAL_EVENTS, Event, EventType, Status
from tests.helpers import WEBHOOK_SECRET, Rig, wait_until
from tests.receiver import Received, Receiver

pytestmark = [pytest.mark.slow, pytest.mark.faults]


WEBHOOKS: dict[str, Any] = {
    "webhook_secret": WEBHOOK_SECRET,
    "webhook_read_timeout_s": 1.0,
    "webhook_connect_timeout_s": 1.0,
    "webhook_claim_idle_s": 2.0,
}


def verify(got: Received) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(WEBHOOK_SECRET).verify(got.body, got.headers)
    assert got.headers["webhook-id"] == payload["id"]
    return payload


def terminal_event(rig: Rig, job_id: str) -> Event:
    client = rig.client()
    [ev] = [e for e in client.store.events(job_id) if EventType(e["type"]) in TERMINAL_EVENTS]
    return ev


def wait_delivered(rig: Rig, job_ids: list[str], timeout: float) -> None:
    store = rig.client().store

    def missing() -> list[str]:
        return [
            j for j in job_ids if not any(d["outcome"] == "delivered" for d in store.deliveries(j))
        ]

    wait_until(
        lambda: not missing(),
        timeout,
        interval=0.1,
        message=lambda: (
            "every job's webhook delivered; not yet: "
            f"{ {j: store.deliveries(j) for j in missing()[:3]} }"
        ),
    )


@pytest.mark.timeout(90)
def test_flaky_and_hanging_receivers_get_every_terminal_event(rig: Rig) -> None:
    """Case 5: a receiver answering 500 half the time, and one that hangs past the read
    timeout on its first attempts: each terminal event arrives, retried under the same
    ``webhook-id``, every attempt signed."""
    rng = random.Random(5)
    lock = threading.Lock()

    def coin() -> Any:
        with lock:
            return 500 if rng.random() < 0.5 else 204

    values: dict[str, Any] = {**WEBHOOKS, "webhook_retry_schedule_s": ",".join(["0.2"] * 16)}
    with Receiver() as receiver:
        flaky = receiver.script("/flaky", coin)
        hanging = receiver.script("/hangs", "hang:3", "hang:3", 204)
        rig.worker(**values)
        rig.dispatcher(**values)
        client = rig.client(**values)
        flaky_jobs = [
            client.submit(prompt=f"flaky {i}", webhook=f"{flaky}?job={i}") for i in range(8)
        ]
        hung_jobs = [
            client.submit(prompt=f"hung {i}", webhook=f"{hanging}?job={i}") for i in range(2)
        ]
        jobs = flaky_jobs + hung_jobs
        records = rig.wait_terminal(client, jobs, timeout=60)
        assert all(r["status"] == Status.SUCCEEDED for r in records.values())
        wait_delivered(rig, jobs, timeout=60)

        by_job: dict[str, list[dict[str, Any]]] = {}
        for got in receiver.received:
            payload = verify(got)  # each attempt signed afresh
            by_job.setdefault(payload["job_id"], []).append(
                {"id": got.headers["webhook-id"], "path": got.path}
            )
        for jid in jobs:
            ids = {a["id"] for a in by_job[jid]}
            assert ids == {terminal_event(rig, jid)["id"]}, (jid, by_job[jid])
        store = client.store
        outcomes = [d["outcome"] for j in flaky_jobs for d in store.deliveries(j)]
        assert outcomes.count("retry") > 0  # the coin did fail some (seeded)
        for jid in hung_jobs:
            log = store.deliveries(jid)
            assert [d["outcome"] for d in log] == ["retry", "retry", "delivered"], log
            assert "Timeout" in log[0]["error"]
        for jid in jobs:  # attempts numbered 1, 2, ... and only the last delivered
            log = store.deliveries(jid)
            assert [d["attempt"] for d in log] == list(range(1, len(log) + 1))
            assert [d["outcome"] for d in log][-1] == "delivered"
        assert store.redis.zcard(K.WEBHOOK_RETRIES) == 0


@pytest.mark.timeout(90)
def test_a_killed_dispatchers_deliveries_are_claimed(rig: Rig) -> None:
    """Case 8: dispatcher A takes several events and dies (SIGKILL) mid-delivery, one of
    them a retry it had leased; B claims every one and delivers it under its id."""
    with Receiver() as receiver:
        rig.worker(**WEBHOOKS)
        a = rig.dispatcher(
            **{**WEBHOOKS, "webhook_read_timeout_s": 30, "webhook_retry_schedule_s": "0.2"}
        )
        client = rig.client(**WEBHOOKS)
        hung = [
            client.submit(
                prompt=f"hung {i}", webhook=receiver.script(f"/crash-{i}", "hang:30", 204)
            )
            for i in range(3)
        ]
        retried = client.submit(
            prompt="retried", webhook=receiver.script("/retry", 500, "hang:30", 204)
        )
        for i in range(3):
            receiver.wait_for(f"/crash-{i}", 1)
        receiver.wait_for("/retry", 2)  # the first try failed; A is in its retry
        assert client.store.redis.zcard(K.WEBHOOK_RETRIES) == 1  # leased by A
        a.kill()

        b = rig.dispatcher(**{**WEBHOOKS, "webhook_retry_schedule_s": "0.2"})
        wait_delivered(rig, [*hung, retried], timeout=30)
        for i, jid in enumerate(hung):
            first, second = receiver.at(f"/crash-{i}")[:2]
            assert (
                first.headers["webhook-id"]
                == second.headers["webhook-id"]
                == terminal_event(rig, jid)["id"]
            )
            verify(second)
            log = client.store.deliveries(jid)
            assert log[-1]["outcome"] == "delivered"
            assert log[-1]["dispatcher"].endswith(f"-{b.pid}")
        attempts = receiver.at("/retry")
        assert len(attempts) == 3
        assert {g.headers["webhook-id"] for g in attempts} == {terminal_event(rig, retried)["id"]}
        assert "claimed abandoned event" in b.log()
        time.sleep(1.0)  # nothing more is sent once delivered
        assert sum(len(receiver.at(f"/crash-{i}")) for i in range(3)) == 6
        assert len(receiver.at("/retry")) == 3
        assert client.store.redis.xpending(K.GLOBAL_EVENTS, K.DISPATCH_GROUP)["pending"] == 0
        assert client.store.redis.zcard(K.WEBHOOK_RETRIES) == 0
