"""``POST /v1/images/generations`` and ``POST /v1/images/edits``: OpenAI's image API.

A request becomes a normal job, taken in as ``POST /v1/jobs`` takes one (key, rate
limit, body limit, validation, ``Idempotency-Key``, admission:
:func:`producer.api.submit.take`), then waited for and answered in OpenAI's shapes
(:mod:`producer.api.openai.results`). Its id is in ``X-Atelier-Job-Id``; it is listed,
streamed and kept like any other job. Refusals are OpenAI's
(:mod:`producer.api.openai.errors`); what each OpenAI field becomes is in
:mod:`producer.api.openai.request` and docs/openai.md.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from producer.api.auth import AUTH_STATUSES, Auth, Caller
from producer.api.openai.errors import OpenAIError
from producer.api.openai.form import read_form
from producer.api.openai.request import (
    Ask,
    EditFields,
    GenerationBody,
    form_schema,
    param_of,
    parse,
    resolve_model,
    translate,
)
from producer.api.openai.results import ClientGone, final_record, images_response, stream
from producer.api.openapi import request_body
from producer.api.schemas import ImagesResponse, openai_refusals
from producer.api.state import ApiState, StateDep
from producer.api.submit import idempotency_header, read_json, take
from producer.core.errors import InvalidRequest

router = APIRouter(prefix="/v1/images", tags=["openai"])

#: Default strength of an edit with a mask: the masked part is drawn anew, as OpenAI's.
MASK_STRENGTH = 1.0

#: One server-sent event of a streamed answer (``stream: true``), as OpenAI's SDKs read it.
_STREAM_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "type": "string",
            "description": "image_generation.partial_image, image_generation.completed "
            "(image_edit.* for an edit), or error.",
        },
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The images (OpenAI's ImagesResponse); with `stream: true`, "
        "server-sent image events. `X-Atelier-Job-Id` names the job.",
        "content": {"text/event-stream": {"schema": _STREAM_EVENT}},
    },
    **openai_refusals(*AUTH_STATUSES, 400, 404, 409, 413, 500, 504),
}
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "The same key and body give the same job (1-255 characters).",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


@router.post(
    "/generations",
    response_model=ImagesResponse,
    operation_id="openai_images_generate",
    summary="Generate images (OpenAI-compatible)",
    responses=_ANSWERS,
    openapi_extra={"requestBody": request_body(GenerationBody), "parameters": [_IDEMPOTENCY]},
)
async def generations(request: Request, state: StateDep, who: Auth) -> Response:
    """OpenAI's `images.generate`: a text-to-image job, waited for."""
    data = await read_json(request, state.settings.max_body_bytes)
    idem = idempotency_header(request)
    body = parse(GenerationBody, data)
    spec = resolve_model(body.model, state.registry, state.settings)
    job, ask = translate(body, spec)
    return await _answer(request, state, who, job, ask, idem, data)


@router.post(
    "/edits",
    response_model=ImagesResponse,
    operation_id="openai_images_edit",
    summary="Edit an image (OpenAI-compatible)",
    responses=_ANSWERS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": form_schema()}},
        },
        "parameters": [_IDEMPOTENCY],
    },
)
async def edits(request: Request, state: StateDep, who: Auth) -> Response:
    """OpenAI's `images.edit`: img2img, or inpainting with a mask, waited for."""
    settings = state.settings
    form = await read_form(request, settings.max_body_bytes, settings.max_image_bytes)
    idem = idempotency_header(request)
    body = parse(EditFields, form.fields)
    spec = resolve_model(body.model, state.registry, settings)
    job, ask = translate(body, spec, form.image_size)
    job["image"] = form.image
    if form.mask is not None:
        job["mask"] = form.mask
        job.setdefault("strength", MASK_STRENGTH)
    return await _answer(request, state, who, job, ask, idem, form.fingerprint)


async def _answer(
    request: Request,
    state: ApiState,
    who: Caller,
    job: dict[str, Any],
    ask: Ask,
    idem: str | None,
    fingerprint: Any,
) -> Response:
    try:
        taken = await anyio.to_thread.run_sync(take, state, job, idem, who, fingerprint)
    except InvalidRequest as exc:
        raise invalid(exc) from None
    record = taken.record
    headers = {"X-Atelier-Job-Id": record["id"]}
    if taken.replayed:
        headers["Idempotent-Replayed"] = "true"
    wait_s = state.settings.openai_wait_s
    if ask.stream:
        return StreamingResponse(
            stream(state, record, ask, wait_s),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        record = await final_record(state, record["id"], wait_s, request)
    except ClientGone:
        # Nobody reads this; the job goes on and its outcome stays visible.
        return Response(status_code=499, headers=headers)
    return JSONResponse(await images_response(state, record, ask), headers=headers)


def invalid(exc: InvalidRequest) -> OpenAIError:
    """A refused atelier request in OpenAI's terms: 400 naming the OpenAI field (every
    bad one in the message), 404 for an unknown model."""
    first = exc.fields[0]["field"] if exc.fields else None
    parts = []
    for f in exc.fields:
        name = param_of(f["field"])
        parts.append(
            f"'{name}'" + (f" ({f['field']})" if name != f["field"] else "") + f": {f['message']}"
        )
    status, code = (
        (404, "model_not_found") if exc.code == "unknown_model" else (400, "invalid_value")
    )
    return OpenAIError(
        status, "Invalid " + "; ".join(parts) + ".", param_of(first) if first else None, code
    )
