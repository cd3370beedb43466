"""A job as a caller sees it: only its own (anyone else's is a 404), without its owner,
with its place in the queue, its webhook deliveries, and outputs a browser can load
(signed URLs of the API's own for ``file://`` storage: :mod:`producer.api.files`)."""

from __future__ import annotations

import json
from typing import Any, cast

from producer.api.auth import Caller
from producer.api.errors import ApiError
from producer.api.state import ApiState
from producer.core import keys as K
from producer.core.contract import Event, Kind, Record, RecordView, Status
from producer.core.errors import JobNotFound


def own_job(state: ApiState, job_id: str, who: Caller) -> Record:
    """The record of ``job_id`` if ``who`` owns it; 404 otherwise."""
    try:
        record = state.store.get(job_id)
    except JobNotFound:
        record = None
    if record is None or record.get("owner") != who.owner:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return record


def _shown(state: ApiState, record: Record) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in record.items() if k != "owner"}
    out.setdefault("kind", Kind.GENERATE.value)  # a record from before kinds
    out["outputs"] = state.files.outputs(record.get("outputs") or [])
    return out


def view(state: ApiState, record: Record) -> RecordView:
    """The record as the API shows it (:class:`producer.api.schemas.JobRecord`)."""
    return views(state, [record])[0]


def views(state: ApiState, records: list[Record]) -> list[RecordView]:
    """Records as the API shows them, their queue places and deliveries read in one
    round trip."""
    pipe = state.store.redis.pipeline(transaction=False)
    for record in records:
        if record["status"] == Status.QUEUED:
            pipe.zrank(K.queued_index_key(record["request"]["model"]), record["id"])
        pipe.lrange(K.deliveries_key(record["id"]), 0, -1)
    replies = iter(pipe.execute() if records else [])
    out = []
    for record in records:
        shown = _shown(state, record)
        if record["status"] == Status.QUEUED:
            rank = next(replies)
            shown["position"] = None if rank is None else int(rank)
        shown["webhook_deliveries"] = [json.loads(x) for x in next(replies)]
        out.append(cast(RecordView, shown))
    return out


def view_event(state: ApiState, event: Event) -> Event:
    """An event as the API shows it: the output or record it carries with the URLs a
    browser can load."""
    data = event.get("data")
    if not isinstance(data, dict) or not ({"output", "job"} & data.keys()):
        return event
    data = dict(data)
    if isinstance(data.get("output"), dict):
        data["output"] = state.files.outputs([data["output"]])[0]
    if isinstance(data.get("job"), dict):
        data["job"] = dict(
            data["job"], outputs=state.files.outputs(data["job"].get("outputs") or [])
        )
    return {**event, "data": data}
