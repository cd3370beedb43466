"""``/v1/jobs``: submit, list, get, cancel, and stream a job's events."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from producer.api import sse
from producer.api.auth import AUTH_STATUSES, Auth
from producer.api.errors import ApiError
from producer.api.openapi import job_links, request_body
from producer.api.records import own_job, view, views
from producer.api.schemas import JobPage, JobRecord, refusals
from producer.api.state import StateDep
from producer.api.submit import idempotency_header, read_json, submit
from producer.core.contract import JobRequest, Kind, Status
from producer.jobs.joblist import CURSOR_PATTERN, DEFAULT_LIMIT, MAX_LIMIT, MODEL_MAX_LENGTH

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

#: A job id in a path: the record of another key's job is a 404 like a missing one.
JOB_ID = "The job's id (from `POST /v1/jobs`)."


@router.post(
    "",
    status_code=202,
    response_model=JobRecord,
    operation_id="submit_job",
    summary="Submit a job",
    responses={
        202: {"description": "Queued: the job's record.", "links": job_links()},
        **refusals(*AUTH_STATUSES, 400, 409, 413, 422),
    },
    openapi_extra={
        "requestBody": request_body(JobRequest),
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "The same key and body give the same job (1-255 characters).",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        ],
    },
)
async def submit_job(request: Request, state: StateDep, who: Auth) -> JSONResponse:
    data = await read_json(request, state.settings.max_body_bytes)
    idem = idempotency_header(request)
    return await anyio.to_thread.run_sync(submit, state, data, idem, who)


@router.get(
    "",
    response_model=JobPage,
    operation_id="list_jobs",
    summary="List your jobs",
    responses=refusals(*AUTH_STATUSES, 422),
)
def list_jobs(
    state: StateDep,
    who: Auth,
    status: Annotated[Status | None, Query(description="Only jobs in this status.")] = None,
    model: Annotated[
        str | None,
        Query(min_length=1, max_length=MODEL_MAX_LENGTH, description="Only jobs of this model."),
    ] = None,
    kind: Annotated[Kind | None, Query(description="Only jobs of this kind.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Jobs per page.")] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(
            pattern=CURSOR_PATTERN,
            description="Where the page starts: `next_cursor` of the page before.",
        ),
    ] = None,
) -> JSONResponse:
    """The caller's own jobs, newest first, a page at a time. A page costs the same
    however many jobs there are; finished jobs leave the list when their records expire
    (`RESULT_TTL_S`)."""
    page = state.up.client.list(
        owner=who.owner, status=status, model=model, kind=kind, limit=limit, cursor=cursor
    )
    return JSONResponse({"data": views(state, page["data"]), "next_cursor": page["next_cursor"]})


@router.get(
    "/{job_id}",
    response_model=JobRecord,
    operation_id="get_job",
    responses=refusals(*AUTH_STATUSES, 404),
    summary="Get a job",
)
def get_job(job_id: str, state: StateDep, who: Auth) -> JSONResponse:
    return JSONResponse(view(state, own_job(state, job_id, who)))


@router.post(
    "/{job_id}/cancel",
    response_model=JobRecord,
    operation_id="cancel_job",
    responses=refusals(*AUTH_STATUSES, 404, 409),
    summary="Cancel a job",
)
def cancel_job(job_id: str, state: StateDep, who: Auth) -> JSONResponse:
    """A queued job is cancelled at once, a running one at its next step (follow
    its events or poll). A job that already ended otherwise is a 409."""
    own_job(state, job_id, who)
    record = state.store.request_cancel(job_id).record
    if Status(record["status"]).is_terminal() and record["status"] != Status.CANCELLED:
        raise ApiError(409, "job_finished", f"job {job_id} already {record['status']}")
    return JSONResponse(view(state, record))


@router.get(
    "/{job_id}/events",
    operation_id="job_events",
    summary="Stream a job's events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": sse.EVENT_SCHEMA}},
            "description": "The job's events as server-sent events.",
        },
        **refusals(*AUTH_STATUSES, 400, 404),
    },
)
async def job_events(
    job_id: str,
    state: StateDep,
    who: Auth,
    last_event_id: Annotated[
        str,
        Header(
            description="Resume after this event id (`<ms>-<seq>`).",
            json_schema_extra={"pattern": sse.EVENT_ID_PATTERN},
        ),
    ] = "",
    after: Annotated[
        str,
        Query(
            description="Resume after this event id, as `Last-Event-ID` (the header wins).",
            json_schema_extra={"pattern": sse.EVENT_ID_PATTERN},
        ),
    ] = "",
) -> StreamingResponse:
    """Events from the start, or after ``Last-Event-ID`` (header, or the ``after``
    query parameter); comments as heartbeats; the stream ends after the terminal
    event."""
    # Both are checked: a bad one is refused even beside a good one.
    if any(value and not sse.LAST_EVENT_ID.fullmatch(value) for value in (last_event_id, after)):
        raise ApiError(
            400,
            "invalid_request",
            "Last-Event-ID is not an event id",
            [{"field": "Last-Event-ID", "message": "expected <ms>-<seq>"}],
        )
    await sse.own(state, job_id, who)
    return StreamingResponse(
        sse.stream(state, job_id, last_event_id or after or None),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
