"""The Redis job store: records, per-job event logs, the global event stream.

A job is a hash ``atelier:job:{id}`` with three fields:

- ``status``: duplicated from the record so the transition script can check it;
- ``token``: the fence of the run that owns the job (``none`` until one starts);
- ``doc``: the whole record as JSON (the field keeps the name it was first given, so
  records already in Redis stay readable across an upgrade; the code says *record*);

plus ``cancel`` once a cancel was asked for, ``lease`` and ``tag`` while a worker holds
the job's message (the worker, and the message's delivery tag; the job is then in
``atelier:leases`` with its lease's expiry), and ``announced``, the attempt a
``job.retrying`` has announced.

Leases (:meth:`JobStore.hold`, :meth:`~JobStore.renew`, :meth:`~JobStore.release`) are
timed by Redis's clock. A start must hold the lease; a terminal transition clears it;
the reconciler (``producer/services/reconciler.py``) takes back a job whose lease ran out.

Every change goes through one Lua script, :data:`producer.jobs.scripts.APPLY`, that
compares and sets: it checks the status is among those allowed and the token is the
one the caller read, then writes the record and appends the event to both streams. So
a terminal status is written once and never changes, a second ``succeeded`` is
impossible, and a run that lost its job (fenced) cannot write anything.

Event ids come from the global stream's ``XADD *`` and are reused for the job's own
stream inside the same script, so one id names an event everywhere: the SSE id and
the webhook id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import redis

from producer.core import keys as K
from producer.core.contract import (
    Event,
    EventType,
    Record,
    Status,
    is_expired,
    now_iso,
    terminal_event,
)
from producer.core.errors import IdempotencyConflict, JobNotFound
from producer.core.redis_url import redis_client
from producer.jobs import scripts as S
from producer.jobs.eventlog import Cursor, decode_batch, decode_event, event_args, events_query
from producer.jobs.idempotency import Claim as Claim
from producer.jobs.idempotency import IdempotencyKey
from producer.jobs.script_io import NEW as NEW
from producer.jobs.script_io import NO_TOKEN as NO_TOKEN
from producer.jobs.script_io import Hold as Hold
from producer.jobs.script_io import HoldResult as HoldResult
from producer.jobs.script_io import Outcome as Outcome
from producer.jobs.script_io import Snapshot as Snapshot
from producer.jobs.script_io import Verdict as Verdict
from producer.jobs.script_io import apply_call, dumps
from producer.jobs.script_io import lane_of as lane_of

ANY_TOKEN = "*"


class JobStore:
    def __init__(self, client: redis.Redis, result_ttl_s: int = K.RESULT_TTL_S) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self._apply = client.register_script(S.APPLY)
        self._flag_cancel = client.register_script(S.FLAG_CANCEL)
        self._hold = client.register_script(S.HOLD)
        self._renew = client.register_script(S.RENEW)
        self._release = client.register_script(S.RELEASE)
        self._release_claim = client.register_script(S.RELEASE_CLAIM)

    @classmethod
    def from_url(cls, url: str, result_ttl_s: int = K.RESULT_TTL_S) -> JobStore:
        # ``url`` may name Sentinels (``sentinel://``): see producer.core.redis_url.
        return cls(redis_client(url, health_check_interval=30, socket_keepalive=True), result_ttl_s)

    # -- writes ---------------------------------------------------------------------

    def apply(
        self,
        job_id: str,
        *,
        allowed: str,
        token: str = ANY_TOKEN,
        record: Record | None = None,
        new_token: str | None = None,
        events: Sequence[tuple[EventType, dict[str, Any]]] = (),
        claim: Claim | None = None,
        lease: str = "",
        requeue: Record | None = None,
        announce: int | None = None,
    ) -> Outcome:
        """Compare-and-set a job: the primitive every transition uses.

        ``allowed``: comma-separated statuses the job must be in (or ``NEW``: must not
        exist); ``token``: the fence the caller read (``ANY_TOKEN`` skips the check).
        ``record`` replaces the record; ``events`` are appended in order, to the job's log
        and the global stream (less the log-only fields, a preview: :func:`shared_data`),
        only if the check passes. ``claim`` (with ``NEW`` only):
        an idempotency key set in the same step, refused (``Verdict.CLAIMED``) if it exists.
        ``lease``: ``held:<worker>`` (that worker must hold the job) or
        ``expired:<worker>|<tag>`` (that lease must have run out; it is cleared).
        ``requeue``: the record whose job waits in its queue again (the queue index).
        ``announce``: the attempt a ``job.retrying`` in ``events`` announces.
        A terminal status clears the job's lease; a new one moves it in the job list.
        """
        keys, args = apply_call(
            job_id,
            allowed=allowed,
            token=token,
            record=record,
            new_token=new_token,
            claim=claim,
            lease=lease,
            requeue=requeue,
            announce=announce,
            result_ttl_s=self.result_ttl_s,
        )
        source = record or requeue
        metadata = source.get("metadata") if source else None
        reply = self._apply(keys=keys.keys(), args=[*args.argv(), *event_args(events, metadata)])
        return Outcome.parse(reply)

    def create(self, record: Record, claim: Claim | None = None) -> Outcome:
        """Write a new ``queued`` record and its ``job.queued`` event (and the
        idempotency key naming it, if any: refused with ``claimed`` when it exists)."""
        return self.apply(
            record["id"],
            allowed=NEW,
            record=record.copy(),
            new_token=NO_TOKEN,
            events=[(EventType.QUEUED, {})],
            claim=claim,
        )

    def claimed(self, idem: IdempotencyKey) -> Record | None:
        """The record of the job ``idem`` names, or None while it names none.

        Raises :class:`IdempotencyConflict` when the key came with another body. The key
        is written with its record (:meth:`create`), so a key naming no record means the
        record expired (``result_ttl_s`` shorter than the key's TTL): it is released.
        """
        raw: Any = self.redis.get(idem.key)
        if raw is None:
            return None
        claim = json.loads(raw)
        if claim["fingerprint"] != idem.fingerprint:
            raise IdempotencyConflict("this Idempotency-Key was used with a different request body")
        try:
            record: Record | None = self.get(claim["job_id"])
        except JobNotFound:
            record = None
        if record is None or record.get("owner") != idem.owner:
            self._release_claim(keys=[idem.key], args=[raw])
            return None
        return record

    def put_input(self, raw: bytes) -> str:
        """Store an inline init image by the sha256 of its bytes; return the digest.

        It outlives any job that refers to it: ``result_ttl_s`` after the last put.
        """
        digest = hashlib.sha256(raw).hexdigest()
        self.redis.set(K.input_key(digest), raw, ex=self.result_ttl_s)
        return digest

    # -- leases -----------------------------------------------------------------------

    def hold(self, job_id: str, worker: str, tag: str, ttl_s: float) -> Hold:
        """Lease a job whose message ``worker`` has just taken (delivery tag ``tag``)."""
        res: Any = self._hold(
            keys=[K.job_key(job_id), K.LEASES], args=[worker, tag, int(ttl_s * 1000), job_id]
        )
        return Hold.parse(res)

    def renew(self, worker: str, job_ids: Sequence[str], ttl_s: float) -> int:
        """Extend the leases ``worker`` still holds among ``job_ids`` (the heartbeat);
        returns how many it still holds."""
        if not job_ids:
            return 0
        return int(
            self._renew(
                keys=[K.LEASES, *(K.job_key(j) for j in job_ids)],
                args=[worker, int(ttl_s * 1000), *job_ids],
            )
        )

    def release(self, job_id: str, worker: str, tag: str) -> bool:
        """Let go of a job this worker holds and did not end: its message is going back
        to the queue (or was a duplicate)."""
        return bool(self._release(keys=[K.job_key(job_id), K.LEASES], args=[worker, tag, job_id]))

    def expired_leases(self, limit: int = 100) -> list[str]:
        """Jobs whose lease ran out (by Redis's clock), oldest first."""
        now_s, now_us = self.redis.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        ids: Any = self.redis.zrangebyscore(K.LEASES, "-inf", now_ms, start=0, num=limit)
        return [i.decode() for i in ids]

    def request_cancel(self, job_id: str) -> Snapshot:
        """Cancel a job: a queued one at once; a running one at its next step.

        Returns the job as it stands after the request.
        """
        for _ in range(10):
            snap = self.load(job_id)
            if snap.status.is_terminal():
                return snap
            if snap.status is Status.QUEUED:
                record: Record = {
                    **snap.record,
                    "status": Status.CANCELLED,
                    "finished_at": now_iso(),
                }
                out = self.apply(
                    job_id,
                    allowed=Status.QUEUED.value,
                    token=snap.token,
                    record=record,
                    events=[terminal_event(record)],
                )
                if out.ok:
                    return self.load(job_id)
                continue  # a worker took it meanwhile: cancel it as running
            # Running: the flag survives a worker crash (the next run sees it); the
            # list wakes the running job's monitor at once. Set only while the job is
            # still running, so a finished record never changes.
            if self._flag_cancel(
                keys=[K.job_key(job_id), K.cancel_key(job_id)], args=[self.result_ttl_s]
            ):
                return self.load(job_id)
        return self.load(job_id)

    # -- reads ----------------------------------------------------------------------

    def load(self, job_id: str) -> Snapshot:
        raw: dict[bytes, bytes] = self.redis.hgetall(K.job_key(job_id))  # type: ignore[assignment]
        if not raw or b"doc" not in raw:
            raise JobNotFound(job_id)
        return Snapshot.from_hash(raw)

    def get(self, job_id: str) -> Record:
        """The record; a queued job past its ``expires_at`` is expired on the way."""
        snap = self.load(job_id)
        if snap.status is Status.QUEUED and is_expired(snap.record):
            self.expire(job_id, snap)
            snap = self.load(job_id)
        return snap.record

    def expire(self, job_id: str, snap: Snapshot) -> Outcome:
        record: Record = {**snap.record, "status": Status.EXPIRED, "finished_at": now_iso()}
        return self.apply(
            job_id,
            allowed=Status.QUEUED.value,
            token=snap.token,
            record=record,
            events=[terminal_event(record)],
        )

    def queue_position(self, record: Record) -> int | None:
        """How many queued jobs of the same model run before this one (None: not queued)."""
        rank: Any = self.redis.zrank(K.queued_index_key(lane_of(record)), record["id"])
        return None if rank is None else int(rank)

    def queued_summary(self, model: str) -> tuple[int, str | None]:
        """Jobs of ``model`` waiting for a worker (``queued``, or taken back from a lost
        worker and waiting for their next run), and the oldest one's ``created_at``.

        The oldest is the smallest creation time across the ten priority bands.
        """
        key = K.queued_index_key(model)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(key)
        for band in range(10):
            low = band * K.QUEUED_BAND
            pipe.zrangebyscore(key, low, low + K.QUEUED_BAND - 1, start=0, num=1, withscores=True)
        count, *bands = pipe.execute()
        oldest_ms = min((int(score) % K.QUEUED_BAND for b in bands for _, score in b), default=None)
        if oldest_ms is None:
            return int(count), None
        ts = datetime.fromtimestamp(oldest_ms / 1000, UTC).isoformat(timespec="milliseconds")
        return int(count), ts.replace("+00:00", "Z")

    def record_delivery(self, job_id: str, attempt: dict[str, Any]) -> None:
        """Append a webhook delivery attempt to the job's delivery log.

        Kept beside the record, not in it: a terminal record never changes, and the
        deliveries of its terminal event happen after it is terminal.
        """
        key = K.deliveries_key(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(key, dumps(attempt))
        pipe.ltrim(key, -K.DELIVERIES_KEPT, -1)
        pipe.expire(key, self.result_ttl_s)
        pipe.execute()

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        raw: Any = self.redis.lrange(K.deliveries_key(job_id), 0, -1)
        return [json.loads(x) for x in raw]

    def request_of(self, job_id: str) -> dict[str, Any] | None:
        """A job's request (None once its record expired), without expiring it."""
        raw: Any = self.redis.hget(K.job_key(job_id), "doc")
        return None if raw is None else json.loads(raw)["request"]

    def event(self, job_id: str, event_id: str) -> Event | None:
        """One event of a job's log (None once the log expired)."""
        entries: Any = self.redis.xrange(K.events_key(job_id), event_id, event_id)
        return decode_event(*entries[0]) if entries else None

    def get_input(self, digest: str) -> bytes | None:
        raw: Any = self.redis.get(K.input_key(digest))
        return None if raw is None else bytes(raw)

    def token(self, job_id: str) -> str | None:
        """The fence of the run that owns the job now (one field, not the record)."""
        raw: Any = self.redis.hget(K.job_key(job_id), "token")
        return None if raw is None else raw.decode()

    def wait_for_cancel(self, job_id: str, timeout_s: float) -> bool:
        """Whether a cancel was asked for, waiting up to ``timeout_s`` for one.

        Wakes at once on the cancel list; also reads the flag, whose list item an
        earlier run of the same job may have taken. One round trip: the flag is read
        in the same pipeline, after the wait (the monitor thread calls this several
        times a job, beside the device).
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.blpop([K.cancel_key(job_id)], timeout=timeout_s)
        pipe.hget(K.job_key(job_id), "cancel")
        popped, flag = pipe.execute()
        return bool(popped) or flag == b"1"

    def events(
        self,
        job_id: str,
        after: str | None = None,
        block_ms: int | None = None,
        count: int = 100,
    ) -> list[Event]:
        """Events after ``after`` (exclusive; None: from the start), waiting up to
        ``block_ms`` for one when none is there yet."""
        key, cursor, kwargs = events_query(job_id, after, block_ms, count)
        return decode_batch(self.redis.xread({key: cursor}, **kwargs))

    def ended(self, job_id: str, after: str | None) -> bool:
        """Whether a reader at ``after`` has had the whole log: the job is terminal (a
        queued one past its deadline is expired on the way) and no event follows.

        Raises :class:`JobNotFound`.
        """
        record = self.get(job_id)
        return Status(record["status"]).is_terminal() and not self.events(job_id, after, count=1)

    def follow(
        self,
        job_id: str,
        after: str | None = None,
        timeout_s: float | None = None,
        poll_ms: int = 1000,
    ) -> Iterator[Event]:
        """Yield a job's events in order from ``after`` until its terminal event."""
        import time

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cursor = Cursor(after)
        while not cursor.done:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout_s} s")
            wait = poll_ms
            if deadline is not None:
                wait = max(1, min(poll_ms, int((deadline - time.monotonic()) * 1000)))
            batch = self.events(job_id, after=cursor.last, block_ms=wait)
            if not batch:
                # Nothing new: make sure the job exists (and expire it if due).
                if self.ended(job_id, cursor.last):
                    return
                continue
            yield from cursor.take(batch)
