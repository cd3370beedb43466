"""Taking a job in over HTTP: the body read under its size limit, then the request
validated, the ``Idempotency-Key`` honoured, the model's queue admitting it and the job
enqueued, all by :meth:`producer.client.Client.take` (the Python client's own path, which
ends in :class:`producer.jobs.intake.Intake`); here, its refusals become HTTP answers.

``POST /v1/jobs`` uses all of it (:func:`submit`); the other routes that make jobs (the
OpenAI-compatible images, trainings) take the same steps through :func:`take`.

- Admission: a model whose queue holds ``max_queue_depth`` messages refuses new jobs
  with 503 and ``Retry-After``; nothing is enqueued.
- ``Idempotency-Key``: the same key and body give the same job for
  ``idempotency_ttl_s``; the same key with another body is a 409
  (:meth:`producer.jobs.store.JobStore.claimed`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from producer.api.auth import Caller
from producer.api.errors import ApiError
from producer.api.records import view
from producer.api.state import ApiState
from producer.core.contract import Kind, Record
from producer.core.errors import IdempotencyConflict, InvalidRequest, KeyClaimed
from producer.jobs.idempotency import IdempotencyKey
from producer.jobs.intake import Admission, QueueFull

log = logging.getLogger("atelier.api")


async def read_body(request: Request, limit: int, too_big: Exception) -> bytes:
    """The body, or ``too_big`` raised past ``limit`` bytes (counted while reading,
    whatever Content-Length says)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past ``limit`` bytes, 400 when it is not JSON."""
    too_big = ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")
    body = await read_body(request, limit, too_big)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from None


def idempotency_header(request: Request) -> str | None:
    idem = request.headers.get("idempotency-key")
    if idem is not None and not 1 <= len(idem) <= 255:
        raise ApiError(
            400,
            "invalid_request",
            "Idempotency-Key must be 1-255 characters",
            [{"field": "Idempotency-Key", "message": "1-255 characters"}],
        )
    return idem


@dataclass
class Taken:
    """A job taken in: its record as it stands, and whether an earlier request with the
    same ``Idempotency-Key`` made it (nothing new was enqueued)."""

    record: Record
    replayed: bool


def take(
    state: ApiState,
    data: Any,
    idem: str | None,
    who: Caller,
    fingerprint: Any = None,
    kind: Kind = Kind.GENERATE,
) -> Taken:
    """Validate and enqueue ``data``, a job of ``kind``, for ``who`` (blocking: run it in
    a thread).

    ``fingerprint`` is what an ``Idempotency-Key`` is bound to (default: ``data``); a
    route whose body is not the job request (the OpenAI-compatible ones) passes its own.
    Raises :class:`~producer.core.errors.InvalidRequest` (nothing enqueued) and
    :class:`ApiError` for every other refusal.
    """
    body = data if fingerprint is None else fingerprint
    key = IdempotencyKey.of(who.owner, idem, body) if idem is not None else None
    admission = Admission(state.up.broker, state.settings.max_queue_depth)
    try:
        taken = state.up.client.take(
            data, kind, owner=who.owner, key=key, admission=admission, check_owner=True
        )
    except IdempotencyConflict as exc:
        raise ApiError(409, exc.code, str(exc)) from None
    except QueueFull as exc:
        raise ApiError(
            503,
            exc.code,
            str(exc),
            headers={"Retry-After": str(state.settings.admission_retry_after_s)},
        ) from None
    except KeyClaimed:
        # A concurrent request with this key is creating its job and has not written it.
        raise ApiError(
            409, "idempotency_in_progress", "a request with this Idempotency-Key is in progress"
        ) from None
    if taken.replay is not None:
        return Taken(taken.replay, True)
    record = state.store.get(taken.job_id)
    model = record["request"]["model"]
    log.info(
        "job %s queued for %s by %s", taken.job_id, model, who.owner, extra={"job_id": taken.job_id}
    )
    return Taken(record, False)


def submit(
    state: ApiState, data: Any, idem: str | None, who: Caller, kind: Kind = Kind.GENERATE
) -> JSONResponse:
    """``POST /v1/jobs`` (``POST /v1/trainings``: ``kind`` train): :func:`take`, answered
    202 with the record (blocking)."""
    try:
        taken = take(state, data, idem, who, kind=kind)
    except InvalidRequest as exc:
        raise ApiError(422, exc.code, str(exc), exc.fields) from None
    job_id = taken.record["id"]
    headers = {"Location": f"/v1/jobs/{job_id}"}
    if taken.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(view(state, taken.record), status_code=202, headers=headers)
