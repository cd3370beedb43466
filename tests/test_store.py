"""JobStore against a real redis-server: compare-and-set transitions, fencing, events.

Cancel, expiry, following a job's events and the TTL of finished records are in
``tests/test_store_lifecycle.py``; the ``store`` and ``make_doc`` fixtures are
``tests/conftest.py``'s, on this module's database."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from producer.core import keys as K
from producer.core.contract import TERMINAL, TERMINAL_EVENT_FOR, TERMINAL_EVENTS, EventType, Status
from producer.core.errors import JobNotFound
from producer.jobs.store import NO_TOKEN, JobStore, Verdict
from tests.records import RESULT_TTL_S, changed, finish, global_events_of, raw_hash, start, types

#: A database no other test file uses; emptied around each test.
DB = 14
TTL = RESULT_TTL_S


def test_create_writes_queued_record_and_event(store: JobStore, make_doc: Any) -> None:
    doc = make_doc(metadata={"order": 17})
    out = store.create(doc)
    assert out.ok
    snap = store.load(doc["id"])
    assert snap.status is Status.QUEUED
    assert snap.token == NO_TOKEN
    assert snap.cancel_requested is False
    assert snap.record == doc
    events = store.events(doc["id"])
    assert types(events) == ["job.queued"]
    ev = events[0]
    assert out.event_ids == (ev["id"],)  # create returns the event id
    assert ev["job_id"] == doc["id"]
    assert ev["data"]["metadata"] == {"order": 17}  # metadata echoed in events
    assert ev["ts"].endswith("Z")
    # A queued record does not expire.
    assert store.redis.ttl(K.job_key(doc["id"])) == -1


def test_second_create_of_same_id_is_refused(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    assert store.create(doc).ok
    other: Any = dict(doc, request={**doc["request"], "prompt": "something else"})
    out = store.create(other)
    assert not out.ok
    assert out.detail is Verdict.STATUS and out.found is Status.QUEUED
    assert store.load(doc["id"]).record == doc
    assert types(store.events(doc["id"])) == ["job.queued"]


def test_load_and_get_of_missing_job(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.load("does-not-exist")
    with pytest.raises(JobNotFound):
        store.get("does-not-exist")


def test_apply_on_missing_job_is_refused(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    out = store.apply(doc["id"], allowed="queued", record=doc, events=[(EventType.STARTED, {})])
    assert not out.ok and out.detail is Verdict.MISSING
    assert store.redis.keys("*") == []


def test_terminal_status_is_final(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    token, running = start(store, doc["id"])
    first = finish(store, doc["id"], token, running, outputs=[{"index": 0, "key": "a"}])
    assert first.ok
    record = store.load(doc["id"])
    events = store.events(doc["id"])
    hash_before = raw_hash(store, doc["id"])
    assert record.status is Status.SUCCEEDED

    # A second "succeeded" by the same run, with different outputs: refused.
    again = finish(store, doc["id"], token, running, outputs=[{"index": 0, "key": "b"}])
    assert not again.ok and again.found is Status.SUCCEEDED
    # Nor may anyone turn it into "failed", even naming the terminal status as allowed
    # and skipping the token check.
    for allowed in ("succeeded", "running,succeeded", "queued,running,succeeded,failed"):
        failed = changed(running, status="failed", error={"code": "internal", "message": "x"})
        out = store.apply(
            doc["id"], allowed=allowed, record=failed, events=[(EventType.FAILED, {"job": failed})]
        )
        assert not out.ok, allowed
        assert out.found is Status.SUCCEEDED
    # A restart of the job is refused too.
    out = store.apply(
        doc["id"],
        allowed="queued,running,succeeded",
        token=token,
        record=changed(running, status="running"),
        new_token="t2",
        events=[(EventType.STARTED, {})],
    )
    assert not out.ok

    assert raw_hash(store, doc["id"]) == hash_before
    assert store.load(doc["id"]).record == record.record
    assert store.events(doc["id"]) == events
    assert [t for _, t in global_events_of(store, doc["id"])] == types(events)


def test_stale_token_is_fenced(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    token_a, running_a = start(store, doc["id"], worker="a")
    # The message is delivered again (worker a seemed dead): run b takes the job over.
    token_b, running_b = start(store, doc["id"], worker="b")
    assert token_a != token_b
    assert store.load(doc["id"]).token == token_b
    assert store.load(doc["id"]).record["attempts"] == 2
    n_events = len(store.events(doc["id"]))

    # Run a wakes up and writes progress, then its outcome: both fenced.
    prog = changed(running_a, progress={"step": 2, "total": 4})
    out = store.apply(
        doc["id"],
        allowed="running",
        token=token_a,
        record=prog,
        events=[(EventType.PROGRESS, {"step": 2, "total": 4})],
    )
    assert not out.ok and out.detail is Verdict.FENCED
    out = finish(store, doc["id"], token_a, running_a, Status.FAILED)
    assert not out.ok and out.detail is Verdict.FENCED
    # A writer that never held a token is fenced as well.
    out = finish(store, doc["id"], NO_TOKEN, running_a)
    assert not out.ok and out.detail is Verdict.FENCED
    snap = store.load(doc["id"])
    assert snap.status is Status.RUNNING and snap.record["worker"] == "b"
    assert len(store.events(doc["id"])) == n_events

    # The owner's write goes through.
    assert finish(store, doc["id"], token_b, running_b).ok
    assert store.load(doc["id"]).status is Status.SUCCEEDED


def test_event_ids_match_the_global_stream(store: JobStore, make_doc: Any) -> None:
    doc = make_doc(metadata={"k": "v"})
    other = make_doc()
    store.create(doc)
    store.create(other)  # interleaved with another job's events
    token, running = start(store, doc["id"])
    for step in (1, 2, 3):
        store.apply(
            doc["id"],
            allowed="running",
            token=token,
            record=changed(running, progress={"step": step, "total": 4}),
            events=[(EventType.PROGRESS, {"step": step, "total": 4})],
        )
    start(store, other["id"])
    out = finish(store, doc["id"], token, running)
    assert out.ok

    local = store.events(doc["id"])
    assert types(local) == [
        "job.queued",
        "job.started",
        "job.progress",
        "job.progress",
        "job.progress",
        "job.succeeded",
    ]
    assert [(e["id"], e["type"]) for e in local] == global_events_of(store, doc["id"])
    assert out.event_ids == (local[-1]["id"],)
    ids = [e["id"] for e in local]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    # The payloads are the same in both streams.
    r: Any = store.redis
    glob = {eid.decode(): f for eid, f in r.xrange(K.GLOBAL_EVENTS)}
    for e in local:
        own = r.xrange(K.events_key(doc["id"]), e["id"], e["id"])
        assert glob[e["id"]][b"data"] == own[0][1][b"data"]
    assert [e["data"]["step"] for e in local if e["type"] == "job.progress"] == [1, 2, 3]


def test_several_events_in_one_apply_keep_their_order(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    snap = store.load(doc["id"])
    out = store.apply(
        doc["id"],
        allowed="queued",
        token=snap.token,
        record=changed(doc, status="running"),
        new_token="t",
        events=[(EventType.RETRYING, {"attempt": 2}), (EventType.STARTED, {})],
    )
    assert out.ok
    ids = list(out.event_ids)
    local = store.events(doc["id"])
    assert types(local)[-2:] == ["job.retrying", "job.started"]
    assert [e["id"] for e in local[-2:]] == ids


def test_racing_finishers_have_exactly_one_winner(store: JobStore, make_doc: Any) -> None:
    doc = make_doc()
    store.create(doc)
    token, running = start(store, doc["id"])
    n = 24
    barrier = threading.Barrier(n)
    results: list[tuple[int, Status, bool]] = []
    lock = threading.Lock()

    def racer(i: int) -> None:
        status = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)[i % 3]
        barrier.wait()
        out = finish(store, doc["id"], token, running, status, worker=f"racer-{i}")
        with lock:
            results.append((i, status, out.ok))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == n
    winners = [r for r in results if r[2]]
    assert len(winners) == 1
    i, status, _ = winners[0]
    snap = store.load(doc["id"])
    assert snap.status is status
    assert snap.record["worker"] == f"racer-{i}"
    terminal = [e for e in store.events(doc["id"]) if EventType(e["type"]) in TERMINAL_EVENTS]
    assert len(terminal) == 1
    assert terminal[0]["type"] == TERMINAL_EVENT_FOR[status].value
    assert terminal[0]["data"]["job"]["worker"] == f"racer-{i}"
    glob_terminal = [
        t for _, t in global_events_of(store, doc["id"]) if EventType(t) in TERMINAL_EVENTS
    ]
    assert len(glob_terminal) == 1


@pytest.mark.parametrize("status", sorted(TERMINAL, key=str))
def test_no_write_leaves_a_terminal_status(store: JobStore, make_doc: Any, status: Status) -> None:
    """Whatever the caller lists as allowed, a terminal record is never written again."""
    past = (datetime.now(UTC) - timedelta(seconds=30)).isoformat(timespec="milliseconds")
    doc = make_doc(created_at=past.replace("+00:00", "Z"), expires_in_s=1)
    store.create(doc)
    if status is Status.EXPIRED:
        store.get(doc["id"])
    elif status is Status.CANCELLED:
        store.request_cancel(doc["id"])
    else:
        token, running = start(store, doc["id"])
        assert finish(store, doc["id"], token, running, status).ok
    assert store.load(doc["id"]).status is status
    before, events = raw_hash(store, doc["id"]), store.events(doc["id"])
    every = ",".join(s.value for s in Status)
    out = store.apply(
        doc["id"],
        allowed=every,
        record=changed(doc, status="queued"),
        new_token=NO_TOKEN,
        events=[(EventType.QUEUED, {})],
    )
    assert not out.ok and out.found is status
    assert raw_hash(store, doc["id"]) == before
    assert store.events(doc["id"]) == events
