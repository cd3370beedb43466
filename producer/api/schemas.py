"""What the API answers: the OpenAPI document's response schemas.

The record and its outputs are the contract's own TypedDicts
(:class:`producer.contract.RecordView`), so the document and the wire cannot drift; the
rest are pydantic models of the API's own answers.

The routes build their JSON themselves (a record is served as stored, less its owner),
so these models describe the wire; they never filter it. :func:`refusals` names the
error statuses a route can answer, each with the one error body.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from producer.contract import RecordView


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: list[dict[str, str]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


#: A job as the API shows it: typed once, in the contract, with its outputs.
JobRecord = RecordView


class ModelList(BaseModel):
    models: list[dict[str, Any]] = Field(description="Each registry model's public view.")


class QueueReport(BaseModel):
    model: str
    kind: str = Field(description="`generate`, or `train` for the model's trainings.")
    queue: str = Field(description="The Celery queue of the model (`atelier.<model>`) or of "
                       "its trainings (`atelier.train.<model>`).")
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
