"""Records a test writes by hand, as a worker would, and what a test reads back of them
in Redis (the record's keys, its events, the Celery messages beside it)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, cast

import redis

from producer.core import keys as K
from producer.core.contract import TERMINAL_EVENT_FOR, Event, EventType, Record, Status, now_iso
from producer.jobs.store import JobStore

#: How long the ``store`` fixture's JobStore keeps a finished record.
RESULT_TTL_S = 3600
#: The Celery queue of tiny-sdxl's jobs: ``"atelier.tiny-sdxl"``.
QUEUE = K.queue_name("tiny-sdxl")


def changed(record: Mapping[str, Any], **fields: Any) -> Record:
    """A copy of ``record`` with ``fields`` changed, as
    :meth:`producer.jobs.store.JobStore.apply` takes a record."""
    return cast(Record, {**record, **fields})


def request_of(record: Record) -> Mapping[str, Any]:
    """A record's normalised request, read as a test reads it: by key, whatever its kind
    (the record types it as the union of every kind's request)."""
    return record["request"]


def start(store: JobStore, job_id: str, worker: str = "w1") -> tuple[str, Record]:
    """Take the job as a worker does; return the run's token and record."""
    snap = store.load(job_id)
    token = secrets.token_hex(8)
    doc = changed(
        snap.record,
        status="running",
        attempts=snap.record["attempts"] + 1,
        worker=worker,
        started_at=now_iso(),
    )
    out = store.apply(
        job_id,
        allowed="queued,running",
        token=snap.token,
        record=doc,
        new_token=token,
        events=[(EventType.STARTED, {"worker": worker})],
    )
    assert out.ok, out.detail
    return token, doc


def finish(
    store: JobStore,
    job_id: str,
    token: str,
    doc: Record,
    status: Status = Status.SUCCEEDED,
    **changes: Any,
) -> Any:
    """End the run holding ``token`` with ``status``, as a worker does; return the outcome."""
    done = changed(doc, status=status.value, finished_at=now_iso(), **changes)
    return store.apply(
        job_id,
        allowed="running",
        token=token,
        record=done,
        events=[(TERMINAL_EVENT_FOR[status], {"job": done})],
    )


def raw_hash(store: JobStore, job_id: str) -> dict[bytes, bytes]:
    r: Any = store.redis
    return dict(r.hgetall(K.job_key(job_id)))


def global_events_of(store: JobStore, job_id: str) -> list[tuple[str, str]]:
    """The (id, type) of the job's events in the global stream."""
    r: Any = store.redis
    return [
        (eid.decode(), f[b"type"].decode())
        for eid, f in r.xrange(K.GLOBAL_EVENTS)
        if f[b"job_id"].decode() == job_id
    ]


def types(events: list[Event]) -> list[str]:
    return [e["type"] for e in events]


def job_keys(r: redis.Redis) -> list[bytes]:
    return list(r.scan_iter(match=K.JOB + "*"))


def queue_keys(r: redis.Redis) -> list[bytes]:
    return [k for k in r.scan_iter(match="*") if k.decode().startswith(QUEUE)]


def queued_messages(r: redis.Redis) -> int:
    return sum(r.llen(k) for k in queue_keys(r) if r.type(k) == b"list")
