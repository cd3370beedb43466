"""Records a test writes by hand."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from producer.core.contract import Record


def changed(record: Mapping[str, Any], **fields: Any) -> Record:
    """A copy of ``record`` with ``fields`` changed, as
    :meth:`producer.jobs.store.JobStore.apply` takes a record."""
    return cast(Record, {**record, **fields})
