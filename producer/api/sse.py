"""A job's events as server-sent events (``GET /v1/jobs/{id}/events``).

Every stream of the process is a watcher of the process's one event reader
(:class:`producer.api.hub.Hub`): it holds no connection and no thread while it waits.
Each event is a frame ``id`` (the event id: resume with ``Last-Event-ID``), ``event``
(its type), ``data`` (the event as JSON); the first frame also carries ``retry``, so no
client sees an event without data. Comments are heartbeats (``SSE_HEARTBEAT_S``); the
stream ends after the terminal event, or early, cleanly, when the client fell too far
behind (``SSE_QUEUE_MAX``) or Redis stayed down: the client resumes with
``Last-Event-ID`` and loses nothing.

Other routes that stream (the studio page, OpenAI's ``stream: true``) use
:meth:`Hub.subscribe <producer.api.hub.Hub.subscribe>` directly, or :func:`stream` for
these same frames.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import AsyncIterator

import redis

from producer.api.auth import Caller
from producer.api.errors import ApiError
from producer.api.records import view_event
from producer.api.state import ApiState
from producer.core.contract import Event, Record

#: The reconnection delay a client is asked to wait (ms), sent with the first event.
RETRY_MS = 2000

#: An event id: a Redis stream id, each part below 2**64 (19 digits always are; a 20-digit
#: one may not be, and Redis refuses it mid-stream).
LAST_EVENT_ID = re.compile(r"\d{1,19}-\d{1,19}")
#: ``Last-Event-ID`` as documented: an event id, or empty (from the start).
EVENT_ID_PATTERN = r"^(\d{1,19}-\d{1,19})?$"

#: One event of the stream, as OpenAPI 3.1 documents a ``text/event-stream`` item.
EVENT_SCHEMA = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "description": "The event id (resume after it)."},
        "event": {"type": "string", "description": "The event type, e.g. job.progress."},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "The event: id, type, job_id, ts, data.",
        },
        "retry": {"type": "integer", "description": "Reconnection delay (ms), first event."},
    },
}


#: Frames of recent events, by event id: a watched job's event goes to many streams,
#: and is encoded once.
_FRAMES: OrderedDict[tuple[str, str], bytes] = OrderedDict()
_FRAMES_KEPT = 4096


def frame(event: Event) -> bytes:
    """The event's frame; encoded once per event, unless it carries outputs (their
    URLs are signed per request: :func:`producer.api.records.view_event`)."""
    key = (event["job_id"], event["id"])
    data = event.get("data")
    if isinstance(data, dict) and {"output", "job"} & data.keys():
        return _encode(event)
    cached = _FRAMES.get(key)
    if cached is not None:
        return cached
    out = _encode(event)
    _FRAMES[key] = out
    if len(_FRAMES) > _FRAMES_KEPT:
        _FRAMES.popitem(last=False)
    return out


def _encode(event: Event) -> bytes:
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


async def own(state: ApiState, job_id: str, who: Caller) -> Record:
    """:func:`producer.api.records.own_job` on the asyncio client (no thread)."""
    record = await state.up.hub.record(job_id)
    if record is None or record.get("owner") != who.owner:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return record


async def stream(state: ApiState, job_id: str, after: str | None) -> AsyncIterator[bytes]:
    """The frames of ``job_id``'s events after ``after``, until its terminal event (or
    a clean early end: the client resumes with ``Last-Event-ID``)."""
    retry = f"retry: {RETRY_MS}\n".encode()
    try:
        async with state.up.hub.subscribe(job_id, after) as watch:
            async for batch in watch.batches():
                if batch is None:
                    # A comment line alone: with no blank line after it, no client
                    # (httpx-sse included) dispatches an empty event for it.
                    yield b": keep-alive\n"
                    continue
                yield retry + b"".join(frame(view_event(state, event)) for event in batch)
                retry = b""
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        # Redis down while this stream joined or replayed: end it; the client retries.
        return
