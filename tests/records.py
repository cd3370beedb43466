"""Records a test writes by hand."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from producer.core.contract import Record


def changed(record: Mapping[str, Any], **fields: Any) -> Record:
    """A copy of ``record`` with ``fields`` changed, as
    :meth:`producer.jobs.store.JobStore.apply` takes a record."""
    return cast(Record, {**record, **fields})


def request_of(record: Record) -> Mapping[str, Any]:
    """A record's normalised request, read as a test reads it: by key, whatever its kind
    (the record types it as the union of every kind's request)."""
    return record["request"]
