"""A job's events as server-sent events (``GET /v1/jobs/{id}/events``).

The log is read as :meth:`producer.store.JobStore.follow` reads it (one
:class:`~producer.eventlog.Cursor`, :meth:`~producer.store.JobStore.ended` when quiet),
on an asyncio client, so a waiting stream holds a connection and no thread. Each event
is a frame ``id`` (the event id: resume with ``Last-Event-ID``), ``event`` (its type),
``data`` (the event as JSON); the first frame also carries ``retry``, so no client sees
an event without data. Comments are heartbeats; the stream ends after the terminal
event.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis

from producer.api.records import view_event
from producer.api.state import ApiState
from producer.errors import JobNotFound
from producer.eventlog import Cursor, read_events

#: How long an event stream waits for Redis to come back before it ends.
SSE_DOWN_S = 30.0
#: The reconnection delay a client is asked to wait (ms), sent with the first event.
RETRY_MS = 2000

LAST_EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")
#: ``Last-Event-ID`` as documented: an event id, or empty (from the start).
EVENT_ID_PATTERN = r"^(\d{1,20}-\d{1,20})?$"

#: One event of the stream, as OpenAPI 3.1 documents a ``text/event-stream`` item.
EVENT_SCHEMA = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "description": "The event id (resume after it)."},
        "event": {"type": "string", "description": "The event type, e.g. job.progress."},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "The event: id, type, job_id, ts, data."},
        "retry": {"type": "integer", "description": "Reconnection delay (ms), first event."},
    },
}


def frame(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


async def stream(state: ApiState, job_id: str, after: str | None) -> AsyncIterator[bytes]:
    """The frames of ``job_id``'s events after ``after``, until its terminal event."""
    cursor = Cursor(after)
    block = int(state.settings.sse_heartbeat_s * 1000)
    retry = f"retry: {RETRY_MS}\n".encode()
    down_since: float | None = None
    while not cursor.done:
        try:
            batch = await read_events(state.up.aredis, job_id, cursor.last, block_ms=block)
        except (redis.ConnectionError, redis.TimeoutError):
            # Redis restarting (or a pooled connection it closed): the pool reconnects on
            # the next call, so the stream goes on where it was. After SSE_DOWN_S of
            # outage it ends; the client resumes with Last-Event-ID.
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > SSE_DOWN_S:
                return
            yield b": reconnecting\n\n"
            await anyio.sleep(0.5)
            continue
        down_since = None
        if not batch:
            # Quiet: a queued job may have expired meanwhile (reading expires it).
            try:
                if await anyio.to_thread.run_sync(state.store.ended, job_id, cursor.last):
                    return
            except JobNotFound:
                return
            yield b": keep-alive\n\n"
            continue
        for event in cursor.take(batch):
            yield retry + frame(view_event(state, event))  # outputs' URLs as served
            retry = b""
