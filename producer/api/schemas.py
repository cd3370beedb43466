"""What the API answers: the OpenAPI document's response schemas.

The record and its outputs are the contract's own TypedDicts
(:class:`producer.core.contract.RecordView`), so the document and the wire cannot drift; the
rest are pydantic models of the API's own answers.

The routes build their JSON themselves (a record is served as stored, less its owner),
so these models describe the wire; they never filter it. :func:`refusals` names the
error statuses a route can answer, each with the one error body.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from producer.core.contract import RecordView


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: list[dict[str, str]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


#: A job as the API shows it: typed once, in the contract, with its outputs.
JobRecord = RecordView


class JobPage(BaseModel):
    data: list[RecordView] = Field(description="The caller's jobs, newest first.")
    next_cursor: str | None = Field(
        description="Pass it as `cursor` for the next page; null on the last page."
    )


class ModelDefaults(BaseModel):
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str


class ModelLimits(BaseModel):
    max_side: int
    max_pixels: int
    max_steps: int = Field(description="The most `steps` a request may ask for.")


class ControlNetOption(BaseModel):
    name: str = Field(description="What `control[].name` may say for this model.")
    family: str = Field(description="The pipeline family it was made for: the model's.")
    kind: str = Field(description="What its control image is: canny, depth, pose, ….")
    preprocess: list[str] = Field(description="The values `control[].preprocess` takes.")


class IpAdapterOption(BaseModel):
    source: str = Field(description="The model's IP-Adapter (its registry source).")
    modes: list[str] = Field(description="The values `references[].mode` takes here.")
    max_images: int = Field(description="How many `references` a request may give.")


class LoraOption(BaseModel):
    name: str = Field(description="What `loras[].name` may say for this model.")
    family: str = Field(description="The pipeline family it was made for: the model's.")


class ModelItem(BaseModel):
    name: str
    pipeline: str = Field(description="The model's family: sdxl, sd15, flux or simulated.")
    source: str
    revision: str | None
    defaults: ModelDefaults
    limits: ModelLimits
    schedulers: list[str]
    cfg: bool = Field(description="Whether it runs classifier-free guidance.")
    size_multiple: int
    references: bool = Field(description="Whether it takes `references` (an IP-Adapter).")
    controlnets: list[ControlNetOption] = Field(
        description="The registry's ControlNets a request for this model may name in "
        "`control` (those of its family); empty: it takes none."
    )
    max_controls: int = Field(description="How many `control` entries a request may give.")
    ip_adapter: IpAdapterOption | None = Field(
        description="What its `references` may be; null: it takes none."
    )
    loras: list[LoraOption] = Field(
        description="The registry's LoRAs a request for this model may name in `loras` "
        "(those of its family); `storage:<key>` and `job:<id>` adapters come besides."
    )


class ModelList(BaseModel):
    models: list[ModelItem] = Field(
        description="Each registry model: its defaults, its limits, and the names "
        "its requests' `control`, `references` and `loras` may use."
    )
    default_model: str = Field(description="The model of a request that names none.")
    aliases: dict[str, str] = Field(
        description="Model names OpenAI clients may send "
        "(ATELIER_OPENAI_MODEL_ALIASES), each to its model."
    )


class QueueReport(BaseModel):
    model: str
    kind: str = Field(description="`generate`, or `train` for the model's trainings.")
    queue: str = Field(
        description="The Celery queue of the model (`atelier.<model>`) or of "
        "its trainings (`atelier.train.<model>`)."
    )
    depth: int = Field(description="Messages waiting in the queue.")
    queued: int = Field(description="Jobs waiting for a worker.")
    oldest_queued_at: str | None
    oldest_age_s: float | None


class QueueList(BaseModel):
    queues: list[QueueReport]


class WorkerList(BaseModel):
    workers: list[dict[str, Any]] = Field(description="Each live worker's last heartbeat.")


class Health(BaseModel):
    status: str


#: Why a route answers each error status.
WHY: dict[int, str] = {
    400: "Malformed: not JSON, or a bad header or query parameter.",
    401: "No valid bearer API key.",
    403: "The key may not do this (an admin key is needed).",
    404: "No such job for this key.",
    409: "Conflicts with the job's state or with an earlier Idempotency-Key.",
    413: "The body is larger than the limit.",
    422: "The request is invalid: every bad field is named.",
    429: "The key's rate limit is spent; see Retry-After.",
    503: "Unavailable (Redis, the broker, or a full queue); see Retry-After.",
}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that refuses with ``statuses``."""
    return {code: {"model": ErrorBody, "description": WHY[code]} for code in sorted(statuses)}


# -- the OpenAI-compatible routes (OpenAI's own shapes) -------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, requests (429) or server_error.")
    param: str | None = Field(description="The OpenAI field refused, if one is.")
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


class ImageData(BaseModel):
    b64_json: str | None = Field(default=None, description="With response_format b64_json.")
    url: str | None = Field(default=None, description="With response_format url.")


class ImagesResponse(BaseModel):
    created: int = Field(description="When the job finished (Unix seconds).")
    data: list[ImageData]
    background: str
    output_format: str
    quality: str
    size: str
    safety_identifier: str | None = None


#: Why an OpenAI-compatible route answers each error status.
OPENAI_WHY: dict[int, str] = {
    **WHY,
    400: "A field is refused (param names it), or the job failed on its input image.",
    404: "No such model (param: model).",
    409: "An earlier Idempotency-Key came with another body, or the job was cancelled.",
    500: "The job failed (code: atelier's error code).",
    503: "Unavailable (Redis, the broker, a full queue: see Retry-After), or the job "
    "expired in the queue.",
    504: "The job is still running after ATELIER_OPENAI_WAIT_S (it goes on; "
    "X-Atelier-Job-Id names it).",
}


def openai_refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """:func:`refusals` in OpenAI's error shape."""
    return {
        code: {"model": OpenAIErrorBody, "description": OPENAI_WHY[code]}
        for code in sorted(statuses)
    }
