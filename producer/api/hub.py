"""Every event stream of one API process, fed by one reader.

One asyncio task (:meth:`Hub._read_loop`) holds one Redis connection and blocks in one
``XREAD`` over the logs of every job this process streams, plus a private *wake* stream:
when a job gets its first watcher the hub appends to the wake stream, so the blocked
read returns and is issued again with the new key. What it reads is fanned out in
process to each watcher's queue. Nothing grows with the number of watchers but memory:

- one reader connection, and at most :data:`CALLS` other calls at once on the API's
  asyncio pool (replays, ownership, the timer's checks), so the API holds a handful of
  Redis connections whatever the number of streams;
- one timer (:meth:`Hub._tick`, twice per ``SSE_HEARTBEAT_S``): a heartbeat for every
  watcher that had nothing for that long, and one pipelined status check of the quiet
  jobs (a record gone ends its streams; a queued job past its deadline is expired, whose
  terminal event then arrives as any other);
- back-pressure: a watcher's queue holds at most ``SSE_QUEUE_MAX`` events; one that
  falls further behind (a stalled client) is cut off: its stream ends cleanly and the
  client resumes with ``Last-Event-ID``. The others never wait for it.

A watcher (:meth:`Hub.subscribe`) registers first, then replays the job's log from
``after`` directly, then takes its queue, dropping what the replay already gave (by id):
no gap and no repeat. Usage, for any route that streams::

    async with hub.subscribe(job_id, after) as watch:
        async for event in watch:      # None: nothing new for a heartbeat interval
            ...                        # (watch.batches(): what waits, as one list)
    watch.reason  # why it ended: "terminal", "gone", "behind", "unavailable", "closed"
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import redis
from redis.asyncio import Redis as AsyncRedis

from producer.core import keys as K
from producer.core.contract import TERMINAL_EVENTS, Event, EventType, Record, Status, is_expired
from producer.jobs.eventlog import decode_event

log = logging.getLogger("atelier.api.hub")

#: Redis calls the hub (and the API's other asyncio calls) make at once, besides the
#: reader's own connection: the bound on the asyncio pool's size.
CALLS = 3
#: How long streams wait for Redis to come back before they end (the client resumes).
DOWN_S = 30.0
#: Entries read per job and per call (replay and live).
BATCH = 200

_IOErrors = (redis.ConnectionError, redis.TimeoutError, OSError)


def event_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class Watch:
    """One watcher of one job: its queue, and why it ended."""

    def __init__(self, hub: Hub, job_id: str, after: str | None) -> None:
        self.hub, self.job_id = hub, job_id
        self.last = after
        self.pending: deque[Event] = deque()
        self.wake = asyncio.Event()
        #: Why the stream ended (None while it runs).
        self.reason: str | None = None
        self.beat = False
        #: When it last gave its client something (the timer's heartbeats go by it).
        self.sent = time.monotonic()

    # -- the hub's side -----------------------------------------------------------------
    def push(self, events: list[Event]) -> None:
        if len(self.pending) + len(events) > self.hub.queue_max:
            self.pending.clear()  # what it misses it replays when it comes back
            self.finish("behind")
            self.hub.cut_off += 1
            return
        self.pending.extend(events)
        self.wake.set()

    def finish(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.hub.leave(self)
        self.wake.set()

    # -- the watcher's side ---------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[Event | None]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event | None]:
        async for batch in self.batches():
            if batch is None:
                yield None
            for event in batch or ():
                yield event

    async def batches(self) -> AsyncIterator[list[Event] | None]:
        """As iterating, but every event waiting at once in one list (a stream writes
        them in one go); None for a heartbeat."""
        async for event in self.hub.replay(self.job_id, self.last):
            self.last, self.sent = event["id"], time.monotonic()
            yield [event]
            if _terminal(event):
                self.finish("terminal")
                return
        while True:
            batch = self._take()
            if batch:
                yield batch
                if _terminal(batch[-1]):
                    self.finish("terminal")
                    return
                continue
            if self.reason is not None:
                return
            if self.beat:
                self.beat, self.sent = False, time.monotonic()
                yield None
                continue
            self.wake.clear()
            await self.wake.wait()

    def _take(self) -> list[Event]:
        """The waiting events the replay did not give, up to a terminal one."""
        out: list[Event] = []
        while self.pending:
            event = self.pending.popleft()
            if self.last is not None and event_key(event["id"]) <= event_key(self.last):
                continue  # the replay had it
            out.append(event)
            self.last = event["id"]
            if _terminal(event):
                break
        if out:
            self.sent = time.monotonic()
        return out


def _terminal(event: Event) -> bool:
    return EventType(event["type"]) in TERMINAL_EVENTS


class Hub:
    """The event streams of one API process (see the module docstring)."""

    def __init__(
        self,
        make_reader: Callable[[], AsyncRedis],
        calls: AsyncRedis,
        heartbeat_s: float,
        queue_max: int,
        expire: Callable[[str], Record] | None = None,
    ) -> None:
        self._make_reader = make_reader
        self.calls = calls
        self.gate = asyncio.Semaphore(CALLS)
        self.heartbeat_s, self.queue_max = heartbeat_s, queue_max
        #: Expires a queued job past its deadline (the store's, blocking: rare).
        self._expire = expire
        self.watchers: dict[str, set[Watch]] = {}
        #: Where the reader stands in each watched job's log (None: being joined).
        self.cursors: dict[str, str | None] = {}
        self._joined: dict[str, asyncio.Event] = {}
        self._seen: set[str] = set()  # jobs that had an event since the last tick
        self.wake_key = K.SSE_WAKE + uuid.uuid4().hex
        self._wake_last = "0-0"
        self.down_since: float | None = None
        self.cut_off = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._reader: AsyncRedis | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._reader = self._make_reader()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="sse-reader"),
            asyncio.create_task(self._tick_loop(), name="sse-timer"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for watch in [w for ws in self.watchers.values() for w in ws]:
            watch.finish("closed")
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.aclose()
        with contextlib.suppress(Exception):
            async with self.gate:
                await self.calls.delete(self.wake_key)

    @property
    def streams(self) -> int:
        return sum(len(ws) for ws in self.watchers.values())

    # -- watchers ---------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str, after: str | None = None) -> AsyncIterator[Watch]:
        """Watch ``job_id``'s events after ``after`` (None: from the start); the stream
        ends after its terminal event, or early with :attr:`Watch.reason` saying why."""
        watch = Watch(self, job_id, after)
        self.watchers.setdefault(job_id, set()).add(watch)
        try:
            await self._join(job_id)
            yield watch
        finally:
            watch.finish(watch.reason or "closed")

    def leave(self, watch: Watch) -> None:
        ws = self.watchers.get(watch.job_id)
        if ws is None:
            return
        ws.discard(watch)
        if not ws:
            del self.watchers[watch.job_id]
            self.cursors.pop(watch.job_id, None)  # the reader drops it at its next read

    async def _join(self, job_id: str) -> None:
        """Make sure the reader follows ``job_id`` from a point no later than now: the
        last entry of its log (what comes after reaches every watcher's queue)."""
        if job_id in self.cursors:
            joined = self._joined.get(job_id)
            if joined is not None:
                await joined.wait()
            if job_id in self.cursors:
                return
        self.cursors[job_id] = None
        joined = self._joined[job_id] = asyncio.Event()
        try:
            async with self.gate:
                last: Any = await self.calls.xrevrange(K.events_key(job_id), count=1)
            if job_id in self.cursors:
                self.cursors[job_id] = _text(last[0][0]) if last else "0-0"
            async with self.gate:
                await self.calls.xadd(self.wake_key, {"j": job_id}, maxlen=1)
                await self.calls.expire(self.wake_key, 3600)
        except BaseException:
            if self.cursors.get(job_id) is None:
                self.cursors.pop(job_id, None)
            raise
        finally:
            if self._joined.get(job_id) is joined:
                del self._joined[job_id]
            joined.set()

    async def replay(self, job_id: str, after: str | None) -> AsyncIterator[Event]:
        """The log as it is now, after ``after``: read directly, in batches."""
        start = f"({after}" if after else "-"
        while True:
            async with self.gate:
                entries: Any = await self.calls.xrange(
                    K.events_key(job_id), start, "+", count=BATCH
                )
            for entry_id, fields in entries:
                yield decode_event(entry_id, fields)
            if len(entries) < BATCH:
                return
            start = f"({_text(entries[-1][0])}"

    async def record(self, job_id: str) -> Record | None:
        """A job's record (None if there is none); a queued one past its deadline is
        expired on the way, as :meth:`producer.jobs.store.JobStore.get` does."""
        import json

        async with self.gate:
            raw = await self.calls.hget(K.job_key(job_id), "doc")
        if raw is None:
            return None
        record = cast(Record, json.loads(raw))
        if record["status"] == Status.QUEUED and is_expired(record) and self._expire:
            record = await asyncio.to_thread(self._expire, job_id)
        return record

    # -- the reader -------------------------------------------------------------------
    async def _read_loop(self) -> None:
        assert self._reader is not None
        block = max(1, int(min(self.heartbeat_s, 5.0) * 1000))
        while True:
            keys = {K.events_key(j): c for j, c in self.cursors.items() if c is not None}
            keys[self.wake_key] = self._wake_last
            try:
                res: Any = await self._reader.xread(keys, block=block, count=BATCH)  # type: ignore[arg-type]
            except _IOErrors as exc:
                await self._down(exc)
                continue
            self.down_since = None
            for key, entries in res or ():
                self._deliver(_text(key), entries)

    def _deliver(self, key: str, entries: list[Any]) -> None:
        if not entries:
            return
        if key == self.wake_key:
            self._wake_last = _text(entries[-1][0])
            return
        job_id = key[len(K.JOB_EVENTS) :]
        if self.cursors.get(job_id) is None:
            return  # nobody watches it any more
        events = [decode_event(eid, fields) for eid, fields in entries]
        self.cursors[job_id] = events[-1]["id"]
        self._seen.add(job_id)
        for watch in list(self.watchers.get(job_id, ())):
            watch.push(events)

    async def _down(self, exc: BaseException) -> None:
        """Redis is unreachable: the reader retries (the pool reconnects); the streams
        get heartbeats meanwhile, and end after :data:`DOWN_S`."""
        now = time.monotonic()
        if self.down_since is None:
            log.warning("event reader: Redis unreachable (%s); retrying", exc)
            self.down_since = now
        elif now - self.down_since > DOWN_S:
            for watch in [w for ws in self.watchers.values() for w in ws]:
                watch.finish("unavailable")
        await asyncio.sleep(0.5)

    # -- the timer --------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        # Twice per period: a stream quiet for a period gets its heartbeat within 1.5.
        while True:
            await asyncio.sleep(self.heartbeat_s / 2)
            try:
                await self._tick()
            except _IOErrors:
                pass  # the reader notices and reports it
            except Exception:  # never lose the timer
                log.exception("event stream timer")

    async def _tick(self) -> None:
        due = time.monotonic() - self.heartbeat_s
        for ws in self.watchers.values():
            for watch in ws:
                if watch.sent <= due:
                    watch.beat = True
                    watch.wake.set()
        quiet = [j for j in self.watchers if j not in self._seen]
        self._seen.clear()
        if quiet:
            await self._check(quiet)

    async def _check(self, job_ids: list[str]) -> None:
        """One pipelined status read of quiet jobs: a record gone ends its streams; a
        queued job is read in full (it may be past its deadline)."""
        async with self.gate:
            pipe = self.calls.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(K.job_key(job_id), "status")
            statuses = await pipe.execute()
        for job_id, status in zip(job_ids, statuses, strict=True):
            if status is None:
                for watch in list(self.watchers.get(job_id, ())):
                    watch.finish("gone")
            elif _text(status) == Status.QUEUED:
                await self.record(job_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
