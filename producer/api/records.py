"""A job as a caller sees it: only its own (anyone else's is a 404), without its owner,
with its place in the queue and its webhook deliveries."""

from __future__ import annotations

from typing import Any

from producer.api.auth import Caller
from producer.api.errors import ApiError
from producer.api.state import ApiState
from producer.contract import Status
from producer.errors import JobNotFound


def own_job(state: ApiState, job_id: str, who: Caller) -> dict[str, Any]:
    """The record of ``job_id`` if ``who`` owns it; 404 otherwise."""
    try:
        record = state.store.get(job_id)
    except JobNotFound:
        record = None
    if record is None or record.get("owner") != who.owner:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return record


def view(state: ApiState, record: dict[str, Any]) -> dict[str, Any]:
    """The record as the API shows it (:class:`producer.api.schemas.JobRecord`)."""
    out = {k: v for k, v in record.items() if k != "owner"}
    if record["status"] == Status.QUEUED:
        out["position"] = state.store.queue_position(record)
    out["webhook_deliveries"] = state.store.deliveries(record["id"])
    return out
