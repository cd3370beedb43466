"""``/v1/trainings``: submit a training (DreamBooth LoRA); everything after the submit is
the job's, through ``/v1/jobs/{id}`` (record, events, cancel)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from producer.api.auth import AUTH_STATUSES, Auth
from producer.api.openapi import job_links, request_body
from producer.api.schemas import JobRecord, refusals
from producer.api.state import StateDep
from producer.api.submit import idempotency_header, read_json, submit
from producer.core.contract import Kind
from producer.core.train_contract import TrainRequest

router = APIRouter(prefix="/v1/trainings", tags=["trainings"])


@router.post(
    "",
    status_code=202,
    response_model=JobRecord,
    operation_id="submit_training",
    summary="Submit a training",
    responses={
        202: {
            "description": "Queued: the training's job record (`kind: train`).",
            "links": job_links(),
        },
        **refusals(*AUTH_STATUSES, 400, 409, 413, 422),
    },
    openapi_extra={
        "requestBody": request_body(TrainRequest),
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "The same key and body give the same training (1-255 characters).",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        ],
    },
)
async def submit_training(request: Request, state: StateDep, who: Auth) -> JSONResponse:
    """A DreamBooth LoRA training of `model` on `images`; follow it as any job
    (`/v1/jobs/{id}`, its events), and use its adapter in a generation's `loras` as
    `job:<id>` once it has succeeded."""
    data = await read_json(request, state.settings.max_body_bytes)
    idem = idempotency_header(request)
    return await anyio.to_thread.run_sync(submit, state, data, idem, who, Kind.TRAIN)
