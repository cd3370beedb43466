"""Leases and the reconciler against a real redis-server, one pass at a time.

A worker's taking of a message is played the way kombu's Redis transport does it
(``BRPOP`` from the queue's list, the message into ``unacked`` under its delivery tag,
the time into ``unacked_index``), so each of the reconciler's cases is set up exactly,
without timing a real worker (the fault suite, ``tests/faults``, does that).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer import Client
from producer.core import keys as K
from producer.core.contract import EventType, Status
from producer.core.settings import Settings
from producer.jobs.broker import send_job
from producer.jobs.store import HoldResult, Verdict
from producer.services.reconciler import Reconciler
from tests.records import changed

#: A database no other test file uses; emptied around each test.
DB = 13
MODEL = "tiny-idle"  # in the test registry, served by no worker


@pytest.fixture
def settings(redis_url: str, models_file: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url.rsplit("/", 1)[0] + f"/{DB}",
        models_file=models_file,
        default_model=MODEL,
        models_dir=str(tmp_path),
        max_attempts=2,
        reconcile_grace_s=0.5,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    c = Client(settings)
    c.store.redis.flushdb()
    yield c
    c.store.redis.flushdb()
    c.close()


@pytest.fixture
def reconciler(settings: Settings, client: Client) -> Reconciler:
    done: list[str] = []
    rec = Reconciler(
        settings,
        client.store,
        client.store.redis,
        client.registry,
        lambda job, model, prio: send_job(client.celery, job, model, prio),
        "test",
        counted=done.append,
    )
    rec.done = done  # type: ignore[attr-defined]
    return rec


def take(client: Client, job_id: str) -> str:
    """Play a worker taking the job's message: kombu's BRPOP and unacked entry."""
    r = client.store.redis
    for key in K.queue_keys(MODEL):
        for raw in r.lrange(key, 0, -1):
            payload = json.loads(raw)
            if payload["headers"]["id"] == job_id:
                r.lrem(key, 1, raw)  # type: ignore[arg-type]  # redis-py: value is str; bytes work
                tag = payload["properties"]["delivery_tag"]
                info = payload["properties"]["delivery_info"]
                r.hset(K.UNACKED, tag, json.dumps([payload, info["exchange"], info["routing_key"]]))
                r.zadd(K.UNACKED_INDEX, {tag: time.time()})
                return str(tag)
    raise AssertionError(f"no message for {job_id}")


def start(client: Client, job_id: str, worker: str, tag: str, ttl_s: float = 0.2) -> str:
    """Lease the job as the worker would, and start it (status running)."""
    held = client.store.hold(job_id, worker, tag, ttl_s)
    assert held.result is HoldResult.OK and held.snapshot is not None
    snap = held.snapshot
    doc = changed(
        snap.record,
        status=Status.RUNNING.value,
        attempts=snap.record["attempts"] + 1,
        worker=worker,
    )
    out = client.store.apply(
        job_id,
        allowed="queued,running",
        token=snap.token,
        record=doc,
        new_token=f"run-{worker}",
        lease=f"held:{worker}",
        events=[(EventType.STARTED, {"attempt": doc["attempts"]})],
    )
    assert out.ok, out
    return f"run-{worker}"


def messages(client: Client, job_id: str) -> list[dict[str, Any]]:
    r = client.store.redis
    return [
        p
        for key in K.queue_keys(MODEL)
        for p in map(json.loads, r.lrange(key, 0, -1))
        if p["headers"]["id"] == job_id
    ]


def test_an_expired_lease_is_taken_back_and_its_message_restored_at_the_head(
    client: Client, reconciler: Reconciler
) -> None:
    ahead = client.submit(prompt="waiting ahead", model=MODEL)
    job_id = client.submit(prompt="its worker died", model=MODEL)
    tag = take(client, job_id)
    old_token = start(client, job_id, "host:1", tag)
    assert client.store.expired_leases() == []
    time.sleep(0.3)
    assert client.store.expired_leases() == [job_id]

    assert reconciler.run_pass()["lease_expired"] == 1
    snap = client.store.load(job_id)
    assert snap.status is Status.RUNNING and snap.lease is None  # waits for a new run
    assert snap.token != old_token and snap.announced == 2  # fenced; retry announced
    log = client.store.events(job_id)
    assert [e["type"] for e in log][-1] == EventType.RETRYING
    assert log[-1]["data"]["attempt"] == 2 and log[-1]["data"]["reason"] == "worker_lost"
    # The old run's writes are refused.
    out = client.store.apply(
        job_id,
        allowed="running",
        token=old_token,
        events=[(EventType.PROGRESS, {"step": 1, "total": 4})],
    )
    assert not out.ok and out.detail is Verdict.FENCED
    # One message, back at the head (the right end) of its list, under a fresh tag.
    [payload] = messages(client, job_id)
    assert payload["properties"]["delivery_tag"] != tag
    assert payload["headers"]["redelivered"] is True
    key = next(k for k in K.queue_keys(MODEL) if client.store.redis.llen(k))
    head, tail = client.store.redis.lindex(key, -1), client.store.redis.lindex(key, 0)
    assert head is not None and tail is not None
    assert json.loads(head)["headers"]["id"] == job_id
    assert json.loads(tail)["headers"]["id"] == ahead
    assert client.store.redis.hlen(K.UNACKED) == 0
    assert client.store.queue_position(client.get(job_id)) is not None  # waiting again
    assert reconciler.done == ["lease_expired"]  # type: ignore[attr-defined]
    # A second pass finds nothing to do.
    assert sum(reconciler.run_pass().values()) == 0


def test_a_renewed_lease_is_left_alone(client: Client, reconciler: Reconciler) -> None:
    job_id = client.submit(prompt="alive", model=MODEL)
    tag = take(client, job_id)
    start(client, job_id, "host:1", tag, ttl_s=0.3)
    for _ in range(4):
        time.sleep(0.15)
        assert client.store.renew("host:1", [job_id], 0.3) == 1
        assert client.store.renew("host:2", [job_id], 0.3) == 0  # only the holder renews
        assert sum(reconciler.run_pass().values()) == 0
    assert client.store.load(job_id).lease == "host:1"


def test_a_job_out_of_attempts_ends_worker_lost(client: Client, reconciler: Reconciler) -> None:
    job_id = client.submit(prompt="kills its worker", model=MODEL)
    for attempt, worker in enumerate(["host:1", "host:2"], 1):
        tag = take(client, job_id)
        start(client, job_id, worker, tag)
        time.sleep(0.3)
        reasons = reconciler.run_pass()
        assert reasons["lease_expired" if attempt == 1 else "worker_lost"] == 1, reasons
    doc = client.get(job_id)
    assert doc["status"] == Status.FAILED and doc["error"] and doc["error"]["code"] == "worker_lost"
    assert doc["attempts"] == 2
    assert messages(client, job_id) == [] and client.store.redis.hlen(K.UNACKED) == 0
    assert client.store.redis.zcard(K.LEASES) == 0


def test_a_second_worker_drops_a_duplicate_of_a_held_job(client: Client) -> None:
    job_id = client.submit(prompt="held", model=MODEL)
    assert client.store.hold(job_id, "host:1", "tag-a", 15).result is HoldResult.OK
    held = client.store.hold(job_id, "host:2", "tag-b", 15)
    assert held.result is HoldResult.HELD and held.holder == "host:1"
    # A start by a worker that does not hold the job is refused.
    snap = client.store.load(job_id)
    out = client.store.apply(
        job_id,
        allowed="queued",
        token=snap.token,
        record=changed(snap.record, status="running"),
        new_token="x",
        lease="held:host:2",
    )
    assert not out.ok
    assert client.store.release(job_id, "host:1", "tag-b") is False  # not that message
    assert client.store.release(job_id, "host:1", "tag-a") is True
    assert client.store.hold(job_id, "host:2", "tag-b", 15).result is HoldResult.OK


def test_a_terminal_transition_clears_the_lease(client: Client) -> None:
    job_id = client.submit(prompt="cancelled while held", model=MODEL)
    assert client.store.hold(job_id, "host:1", "tag-a", 15).result is HoldResult.OK
    assert client.store.redis.zcard(K.LEASES) == 1
    assert client.cancel(job_id)["status"] == Status.CANCELLED
    assert client.store.redis.zcard(K.LEASES) == 0
    assert client.store.load(job_id).lease is None
    assert client.store.hold(job_id, "host:2", "tag-b", 15).found is Status.CANCELLED


def test_a_queued_job_whose_message_is_nowhere_is_republished_once(
    client: Client, reconciler: Reconciler
) -> None:
    job_id = client.submit(prompt="lost in the BRPOP window", model=MODEL)
    tag = take(client, job_id)  # taken...
    client.store.redis.hdel(K.UNACKED, tag)  # ...and lost before kombu recorded it
    client.store.redis.zrem(K.UNACKED_INDEX, tag)
    assert sum(reconciler.run_pass().values()) == 0  # within the grace: left alone
    time.sleep(0.6)
    assert reconciler.run_pass()["message_lost"] == 1
    [payload] = messages(client, job_id)
    assert payload["headers"]["task"] == K.TASK_GENERATE
    assert payload["properties"]["priority"] == 9 - client.get(job_id)["request"]["priority"]
    assert sum(reconciler.run_pass().values()) == 0  # there now: never twice
    assert len(messages(client, job_id)) == 1


def test_an_orphaned_unacked_entry_is_restored_not_duplicated(
    client: Client, reconciler: Reconciler
) -> None:
    """A worker died between kombu's BRPOP and its lease: the entry is in ``unacked``,
    older than the grace, and nobody holds the job."""
    job_id = client.submit(prompt="taken, never leased", model=MODEL)
    tag = take(client, job_id)
    client.store.redis.zadd(K.UNACKED_INDEX, {tag: time.time() - 5})
    time.sleep(0.6)
    assert reconciler.run_pass()["message_lost"] == 1
    [payload] = messages(client, job_id)
    assert payload["properties"]["delivery_tag"] != tag
    assert client.store.redis.hlen(K.UNACKED) == 0


def test_a_just_taken_message_is_not_republished(client: Client, reconciler: Reconciler) -> None:
    job_id = client.submit(prompt="being leased", model=MODEL)
    time.sleep(0.6)  # the job is older than the grace...
    take(client, job_id)  # ...but its message was taken a moment ago
    assert reconciler.run_pass()["message_lost"] == 0
    assert messages(client, job_id) == []


def test_only_one_process_makes_a_pass_per_interval(
    settings: Settings, client: Client, reconciler: Reconciler
) -> None:
    other = Reconciler(
        settings, client.store, client.store.redis, client.registry, lambda *a: None, "other"
    )
    assert reconciler.tick() is True
    assert other.tick() is False
    assert client.store.redis.get(K.RECONCILE_LOCK) == b"test"


def test_dead_dispatcher_consumers_are_removed(settings: Settings, client: Client) -> None:
    r = client.store.redis
    r.xgroup_create(K.GLOBAL_EVENTS, K.DISPATCH_GROUP, id="0", mkstream=True)
    client.submit(prompt="an event", model=MODEL)
    client.submit(prompt="another", model=MODEL)
    r.xreadgroup(K.DISPATCH_GROUP, "busy", {K.GLOBAL_EVENTS: ">"}, count=1)  # pending
    # A RESP2 reply, [[stream, [(id, fields)]]]; redis-py's type covers RESP3's dict too.
    reply: Any = r.xreadgroup(K.DISPATCH_GROUP, "gone", {K.GLOBAL_EVENTS: ">"}, count=1)
    [[_, [(eid, _)]]] = reply
    r.xack(K.GLOBAL_EVENTS, K.DISPATCH_GROUP, eid)  # it handled its event, then died
    quick = settings.model_copy(update={"webhook_claim_idle_s": 0.2})
    rec = Reconciler(quick, client.store, r, client.registry, lambda *a: None, "t")
    time.sleep(0.3)
    assert rec.run_pass()["dispatcher_consumer"] == 1
    names = {c["name"] for c in r.xinfo_consumers(K.GLOBAL_EVENTS, K.DISPATCH_GROUP)}
    assert names == {b"busy"} or names == {"busy"}
