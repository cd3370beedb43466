"""The answers of the OpenAI-compatible routes: a job waited for, then OpenAI's
``ImagesResponse``, or its stream of image events.

The wait reads the job's event log on the asyncio Redis client (as the SSE route does),
so a waiting request holds a connection and no thread. It ends at the terminal event,
after ``ATELIER_OPENAI_WAIT_S`` (504; the job goes on), or when the client goes away
(the job goes on, and its outcome is kept as every job's is: ``/v1/jobs/{id}``, and a
retry with the same ``Idempotency-Key`` answers with it).

A stream sends ``{kind}.partial_image`` events made from the job's previews (re-encoded
to the requested format), at most ``partial_images`` of them, then one
``{kind}.completed`` event per image; a refusal after the stream began is an ``error``
event ``{"type": "error", "error": {...}}``, which both SDKs raise as ``APIError``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis
from fastapi import Request

from producer.api.openai.errors import OpenAIError
from producer.api.openai.request import Ask
from producer.api.state import ApiState
from producer.core.contract import TERMINAL_EVENTS, Event, EventType, Record, Status, parse_iso
from producer.core.errors import JobNotFound
from producer.core.images import decode_data_uri, open_image

#: How often a wait looks whether its client is still there (and a stream may send a
#: keep-alive comment).
POLL_S = 1.0
#: A failed job's error code: the status it is answered with, the field it blames.
FAILURES: dict[str, tuple[int, str | None]] = {
    "image_invalid": (400, "image"),
    "image_fetch_failed": (400, "image"),
    "invalid_request": (400, None),
    "storage_unavailable": (503, None),
}
#: OpenAI's completed events carry token usage; atelier counts none.
NO_USAGE = {
    "input_tokens": 0,
    "output_tokens": 0,
    "total_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
}


class ClientGone(Exception):
    """The client of a wait disconnected; its job goes on."""


def job_headers(job_id: str) -> dict[str, str]:
    """What every answer about a job carries: its id, and that repeating the request
    would not change its outcome (atelier already retried inside the job)."""
    return {"X-Atelier-Job-Id": job_id, "x-should-retry": "false"}


async def follow(state: ApiState, job_id: str, deadline: float) -> AsyncIterator[Event | None]:
    """The job's events up to its terminal one, and None each quiet poll; it ends at
    ``deadline`` (monotonic) too. Read through the process's hub (one Redis reader for
    every stream: producer/api/hub.py); a task moves them to a queue this loop can wait
    on with a timeout (cancelling a wait inside the hub's iterator would end it)."""
    queue: asyncio.Queue[Event | None] = asyncio.Queue(state.settings.sse_queue_max)

    async def pump() -> None:
        try:
            async with state.up.hub.subscribe(job_id) as watch:
                async for event in watch:
                    if event is not None:
                        await queue.put(event)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass  # Redis down: the caller's next read of the record says so
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)  # the end

    task = asyncio.create_task(pump())
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                item = await asyncio.wait_for(queue.get(), min(left, POLL_S))
            except TimeoutError:
                if task.done() and queue.empty():
                    return  # ended with a full queue: no room was left for its mark
                yield None
                continue
            if item is None:
                return
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def final_record(state: ApiState, job_id: str, wait_s: float, request: Request) -> Record:
    """The job's record once it is terminal; 504 after ``wait_s``; :class:`ClientGone`
    as soon as the client disconnects (the wait stops, the job goes on)."""
    outcome: list[Record | Exception] = []

    async def wait(scope: anyio.CancelScope) -> None:
        try:
            outcome.append(await _terminal(state, job_id, wait_s))
        except Exception as exc:  # noqa: BLE001 (raised below, outside the task group)
            outcome.append(exc)
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(wait, group.cancel_scope)
        # The body is read: the next message is the disconnect (or, once the answer is
        # sent, its stand-in), so this returns only when the client has gone.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        group.cancel_scope.cancel()
    if not outcome:
        raise ClientGone(job_id)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


async def _terminal(state: ApiState, job_id: str, wait_s: float) -> Record:
    async for event in follow(state, job_id, time.monotonic() + wait_s):
        if event is not None and EventType(event["type"]) in TERMINAL_EVENTS:
            break
    record = await anyio.to_thread.run_sync(state.store.get, job_id)
    if not Status(record["status"]).is_terminal():
        raise still_running(record, wait_s)
    return record


def still_running(record: Record, wait_s: float) -> OpenAIError:
    job_id = record["id"]
    return OpenAIError(
        504,
        f"Job {job_id} is still {record['status']} after {wait_s:g} s; "
        f"it goes on: GET /v1/jobs/{job_id} for its outcome.",
        None,
        "wait_timeout",
        job_headers(job_id),
    )


def failure(record: Record) -> OpenAIError:
    """The refusal that tells a client its job did not succeed."""
    job_id, status = record["id"], record["status"]
    headers = job_headers(job_id)
    if status == Status.CANCELLED:
        return OpenAIError(409, f"Job {job_id} was cancelled.", None, "cancelled", headers)
    if status == Status.EXPIRED:
        return OpenAIError(
            503, f"Job {job_id} expired before a worker took it.", None, "expired", headers
        )
    error = record.get("error")
    code = error.get("code", "internal") if error else "internal"
    message = error.get("message", "") if error else ""
    status_code, param = FAILURES.get(code, (500, None))
    if param == "image" and message.startswith("mask"):
        param = "mask"
    return OpenAIError(status_code, f"Job {job_id} failed: {message}", param, code, headers)


async def images_response(
    state: ApiState, record: Record, ask: Ask, b64: bool | None = None
) -> dict[str, Any]:
    """OpenAI's ``ImagesResponse`` of a terminal record (raises :func:`failure` unless it
    succeeded)."""
    if record["status"] != Status.SUCCEEDED:
        raise failure(record)
    stored = [k for o in record["outputs"] if (k := o.get("key")) and not o.get("contact_sheet")]
    if not stored:
        raise OpenAIError(
            400,
            f"Job {record['id']}: every image was withheld by the safety checker.",
            None,
            "moderation_blocked",
            job_headers(record["id"]),
        )
    inline = ask.response_format == "b64_json" if b64 is None else b64
    data = []
    for key in stored:
        if inline:
            raw = await anyio.to_thread.run_sync(state.up.storage.get, key)
            data.append({"b64_json": base64.b64encode(raw).decode()})
        else:
            # A presigned S3 URL, or the API's own signed one for file:// storage.
            local = state.files.storage is not None
            url = (state.files.url if local else state.up.storage.url)(key)
            data.append({"url": url})
    assert record["finished_at"] is not None  # a terminal record's
    body: dict[str, Any] = {
        "created": int(parse_iso(record["finished_at"]).timestamp()),
        "data": data,
        "background": "opaque",
        "output_format": ask.output_format,
        "quality": ask.quality,
        "size": ask.size,
    }
    if ask.user:
        body["safety_identifier"] = ask.user
    return body


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def error_event(exc: OpenAIError) -> bytes:
    return sse("error", {"type": "error", **exc.body()})


async def stream(state: ApiState, record: Record, ask: Ask, wait_s: float) -> AsyncIterator[bytes]:
    """The job as OpenAI's image events, until its images (or a refusal) are sent."""
    job_id = record["id"]
    sent, last_write = 0, time.monotonic()
    head = {
        "background": ask.background,
        "output_format": ask.output_format,
        "quality": ask.quality,
        "size": ask.size,
    }
    try:
        async for event in follow(state, job_id, time.monotonic() + wait_s):
            preview = event["data"].get("preview") if event is not None else None
            if preview and sent < ask.partial_images:
                b64 = await anyio.to_thread.run_sync(
                    reencode, preview, ask.output_format, state.settings.max_image_bytes
                )
                yield sse(
                    f"{ask.kind}.partial_image",
                    {
                        "type": f"{ask.kind}.partial_image",
                        "b64_json": b64,
                        "partial_image_index": sent,
                        "created_at": int(time.time()),
                        **head,
                    },
                )
                sent, last_write = sent + 1, time.monotonic()
            elif event is None and time.monotonic() - last_write > state.settings.sse_heartbeat_s:
                yield b": keep-alive\n\n"
                last_write = time.monotonic()
        done = await anyio.to_thread.run_sync(state.store.get, job_id)
        if not Status(done["status"]).is_terminal():
            raise still_running(done, wait_s)
        body = await images_response(state, done, ask, b64=True)
        for image in body["data"]:
            completed = {
                "type": f"{ask.kind}.completed",
                "b64_json": image["b64_json"],
                "created_at": body["created"],
                "usage": NO_USAGE,
                **head,
            }
            if ask.user:
                completed["safety_identifier"] = ask.user
            yield sse(f"{ask.kind}.completed", completed)
    except OpenAIError as exc:
        yield error_event(exc)
    except (redis.RedisError, JobNotFound) as exc:
        yield error_event(
            OpenAIError(
                503,
                f"The job store is unavailable: {exc}",
                None,
                "unavailable",
                job_headers(job_id),
            )
        )


def reencode(preview: str, output_format: str, max_bytes: int) -> str:
    """A preview (``data:image/webp;base64,...``) as base64 of ``output_format``."""
    head, _, payload = preview.partition(",")
    if output_format == "webp" and head.startswith("data:image/webp"):
        return payload
    image = open_image(decode_data_uri(preview, max_bytes))
    out = io.BytesIO()
    image.save(out, {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format])
    return base64.b64encode(out.getvalue()).decode()
