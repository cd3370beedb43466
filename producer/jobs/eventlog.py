"""Reading a job's event log (a Redis stream): entries decoded into events, and where a
reader stands.

The writing side is the store's (:meth:`producer.jobs.store.JobStore.apply`). The reading
side is :meth:`~producer.jobs.store.JobStore.follow` (blocking, for the client and the
CLI); the API's streams read through its hub
(``producer/api/hub.py``: one reader for all of them), which decodes with
:func:`decode_event`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

from producer.core import keys as K
from producer.core.contract import TERMINAL_EVENTS, Event, EventType, Record, shared_data


def decode_event(entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
    """A stream entry as an :class:`~producer.core.contract.Event` (its ``type`` the
    text the entry holds: the enum's value)."""

    def s(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else v

    f = {s(k): s(v) for k, v in fields.items()}
    event = {
        "id": s(entry_id),
        "type": f["type"],
        "job_id": f["job_id"],
        "ts": f["ts"],
        "data": json.loads(f["data"]),
    }
    return cast(Event, event)


def carried_record(event: Event) -> Record | None:
    """The record an event carries (``data.job``: a terminal event's), if any."""
    job = event["data"].get("job")
    return cast(Record, job) if isinstance(job, dict) else None


class Cursor:
    """Where a reader of a job's log stands: the last event id it has, and whether that
    was the terminal event (nothing comes after it), as :meth:`JobStore.follow` reads."""

    def __init__(self, after: str | None = None) -> None:
        self.last = after
        self.done = False

    def take(self, batch: list[Event]) -> list[Event]:
        """The events of ``batch`` up to and including a terminal one."""
        out = []
        for ev in batch:
            out.append(ev)
            self.last = ev["id"]
            if EventType(ev["type"]) in TERMINAL_EVENTS:
                self.done = True
                break
        return out


def events_query(
    job_id: str, after: str | None, block_ms: int | None, count: int
) -> tuple[str, str, dict[str, Any]]:
    kwargs: dict[str, Any] = {"count": count}
    if block_ms is not None:
        kwargs["block"] = block_ms
    return K.events_key(job_id), after or "0-0", kwargs


def decode_batch(res: Any) -> list[Event]:
    if not res:
        return []
    return [decode_event(eid, fields) for eid, fields in res[0][1]]


def event_args(events: Sequence[tuple[EventType, dict[str, Any]]], metadata: Any) -> list[str]:
    """Three script arguments per event: its type, its data for the job's log, and its
    data for the global stream ('' when the same: no log-only field such as a preview)."""
    args: list[str] = []
    for etype, data in events:
        if metadata:  # metadata is echoed in every event
            data = {**data, "metadata": metadata}
        shared = shared_data(data)
        args += [etype.value, _compact(data), "" if shared is data else _compact(shared)]
    return args


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
