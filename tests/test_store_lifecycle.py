"""JobStore against a real redis-server: the ends of a job. Cancel (queued, running,
finished), expiry past ``expires_at``, following a job's events to its end, and the TTL a
finished record gets."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from producer.core import keys as K
from producer.core.contract import Event, EventType, Status
from producer.jobs.store import NO_TOKEN, JobStore
from tests.records import RESULT_TTL_S, changed, finish, raw_hash, start, types

#: A database no other test file uses; emptied around each test.
DB = 5
TTL = RESULT_TTL_S


def test_cancel_of_queued_job_is_immediate(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    snap = store.request_cancel(doc["id"])
    assert snap.status is Status.CANCELLED
    assert snap.record["status"] == "cancelled"
    assert snap.record["finished_at"]
    events = store.events(doc["id"])
    assert types(events) == ["job.queued", "job.cancelled"]
    assert events[-1]["data"]["job"]["status"] == "cancelled"
    assert 0 < store.redis.ttl(K.job_key(doc["id"])) <= TTL
    # A worker that now receives the message cannot start it.
    out = store.apply(
        doc["id"],
        allowed="queued,running",
        token=NO_TOKEN,
        record=changed(doc, status="running"),
        new_token="t",
        events=[(EventType.STARTED, {})],
    )
    assert not out.ok and out.found is Status.CANCELLED
    # Cancelling again changes nothing.
    again = store.request_cancel(doc["id"])
    assert again.record == snap.record
    assert len(store.events(doc["id"])) == 2


def test_cancel_of_running_job_sets_flag_and_signals(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    token, running = start(store, doc["id"])
    assert store.redis.llen(K.cancel_key(doc["id"])) == 0
    snap = store.request_cancel(doc["id"])
    assert snap.status is Status.RUNNING  # stops at its next step
    assert snap.cancel_requested is True
    assert store.load(doc["id"]).cancel_requested is True
    assert store.redis.llen(K.cancel_key(doc["id"])) >= 1
    assert 0 < store.redis.ttl(K.cancel_key(doc["id"])) <= TTL
    assert store.redis.blpop([K.cancel_key(doc["id"])], timeout=1) is not None
    assert types(store.events(doc["id"])) == ["job.queued", "job.started"]
    # The flag does not touch the token: the run still owns the job and ends it.
    assert store.load(doc["id"]).token == token
    assert finish(store, doc["id"], token, running, Status.CANCELLED).ok
    assert store.load(doc["id"]).status is Status.CANCELLED


def test_cancel_of_finished_job_changes_nothing(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    token, running = start(store, doc["id"])
    finish(store, doc["id"], token, running)
    before = raw_hash(store, doc["id"])
    snap = store.request_cancel(doc["id"])
    assert snap.status is Status.SUCCEEDED
    assert raw_hash(store, doc["id"]) == before
    assert store.redis.exists(K.cancel_key(doc["id"])) == 0


def test_get_expires_a_queued_job_past_expires_at(store: JobStore, make_doc: Any) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=30)).isoformat(timespec="milliseconds")
    old = make_doc(created_at=past.replace("+00:00", "Z"), expires_in_s=10)
    fresh = make_doc(expires_in_s=3600)
    never = make_doc(created_at=past.replace("+00:00", "Z"))
    for d in (old, fresh, never):
        store.create(d)
    assert old["expires_at"] and fresh["expires_at"] and never["expires_at"] is None

    rec = store.get(old["id"])
    assert rec["status"] == "expired"
    assert rec["finished_at"]
    assert store.load(old["id"]).status is Status.EXPIRED
    events = store.events(old["id"])
    assert types(events) == ["job.queued", "job.expired"]
    assert events[-1]["data"]["job"]["status"] == "expired"
    assert 0 < store.redis.ttl(K.job_key(old["id"])) <= TTL
    # Reading again does not expire it twice.
    assert store.get(old["id"])["status"] == "expired"
    assert len(store.events(old["id"])) == 2

    assert store.get(fresh["id"])["status"] == "queued"
    assert store.get(never["id"])["status"] == "queued"


def test_get_does_not_expire_a_running_job(store: JobStore, make_doc: Any) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=30)).isoformat(timespec="milliseconds")
    doc = make_doc(created_at=past.replace("+00:00", "Z"), expires_in_s=10)
    store.create(doc)
    start(store, doc["id"])  # expires_in_s bounds queued time only
    assert store.get(doc["id"])["status"] == "running"


def test_follow_yields_in_order_and_stops_after_terminal(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    token, running = start(store, doc["id"])

    def writer() -> None:
        for step in (1, 2, 3, 4):
            time.sleep(0.02)
            store.apply(
                doc["id"],
                allowed="running",
                token=token,
                record=changed(running, progress={"step": step, "total": 4}),
                events=[(EventType.PROGRESS, {"step": step, "total": 4})],
            )
        time.sleep(0.02)
        finish(store, doc["id"], token, running)

    t = threading.Thread(target=writer)
    t.start()
    seen = list(store.follow(doc["id"], timeout_s=10, poll_ms=50))
    t.join(5)
    assert types(seen) == ["job.queued", "job.started"] + ["job.progress"] * 4 + ["job.succeeded"]
    assert [e["data"]["step"] for e in seen if e["type"] == "job.progress"] == [1, 2, 3, 4]
    assert seen[-1]["data"]["job"]["status"] == "succeeded"

    # Resuming after any id gives exactly the rest, without repeats.
    for k in range(len(seen)):
        rest = list(store.follow(doc["id"], after=seen[k]["id"], timeout_s=5, poll_ms=50))
        assert [e["id"] for e in rest] == [e["id"] for e in seen[k + 1 :]]


def test_follow_after_the_terminal_event_returns_at_once(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    store.request_cancel(doc["id"])
    last = store.events(doc["id"])[-1]
    t0 = time.monotonic()
    assert list(store.follow(doc["id"], after=last["id"], timeout_s=5, poll_ms=50)) == []
    assert time.monotonic() - t0 < 2


def test_follow_times_out_on_a_job_that_does_not_finish(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    seen: list[Event] = []
    with pytest.raises(TimeoutError):
        for ev in store.follow(doc["id"], timeout_s=0.3, poll_ms=50):
            seen.append(ev)
    assert types(seen) == ["job.queued"]


def test_follow_sees_expiry_of_a_waiting_job(store: JobStore, make_doc: Any) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=30)).isoformat(timespec="milliseconds")
    doc = make_doc(created_at=past.replace("+00:00", "Z"), expires_in_s=1)
    store.create(doc)
    seen = list(store.follow(doc["id"], timeout_s=5, poll_ms=50))
    assert types(seen) == ["job.queued", "job.expired"]


@pytest.mark.parametrize("status", [Status.SUCCEEDED, Status.FAILED, Status.CANCELLED])
def test_terminal_records_get_a_ttl(store: JobStore, make_doc: Any, status: Status) -> None:
    doc = make_doc()
    store.create(doc)
    token, running = start(store, doc["id"])
    assert store.redis.ttl(K.job_key(doc["id"])) == -1
    assert store.redis.ttl(K.events_key(doc["id"])) == -1
    assert finish(store, doc["id"], token, running, status).ok
    assert 0 < store.redis.ttl(K.job_key(doc["id"])) <= TTL
    assert 0 < store.redis.ttl(K.events_key(doc["id"])) <= TTL
    # The global stream is shared and capped by length, never expired.
    assert store.redis.ttl(K.GLOBAL_EVENTS) == -1
