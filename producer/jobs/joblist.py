"""The job list: an owner's jobs, newest first, filtered by status, kind and model, one
page at a time (``GET /v1/jobs``, :meth:`producer.Client.list`, ``atelier jobs``).

The index (keys in :mod:`producer.core.keys`, scripts in :mod:`producer.jobs.scripts`):

- per owner, one sorted set for each combination of the three filters, each given or
  ``*`` (``atelier:list:<owner>:<status>:<kind>:<model>``, 8 sets a job is in). So any
  filter is one set, and no page scans past what it returns;
- a member is ``<created_ms, 13 digits>:<job id>``, all scores 0: lexical order is
  creation order (ties by id), and a cursor is the last member a page gave. A page is
  one ``ZRANGE ... BYLEX REV LIMIT`` from it and one ``HGET`` per record, in one
  script: O(log N + limit), whatever N;
- written by the transition script (:data:`producer.jobs.scripts.APPLY`) in the step that
  changes the status, so the list and the records never disagree;
- a finished job's entry goes into ``atelier:list-expiry``, scored by when its record
  expires. Due entries are pruned up to 4 at each terminal transition (which adds one)
  and up to :data:`PRUNE_ON_READ` at each page read, each prune 9 ``ZREM``: the backlog
  drains as long as jobs keep finishing or pages are read, and a page's own work stays
  bounded. A member whose record is gone anyway (evicted under ``maxmemory``, or expired
  before its prune) is dropped from the set being read and skipped, at most 1,000 such
  per page.

Jobs written before the list existed join it at their next status change.
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import redis
from typing_extensions import TypedDict

from producer.core import keys as K
from producer.core.contract import Kind, Record, Status, parse_iso
from producer.core.errors import InvalidRequest, JobNotFound
from producer.jobs import scripts as S

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
#: Expired jobs taken out of the list at each page read, at most.
PRUNE_ON_READ = 100
#: A cursor: the last member of a page (opaque to callers).
CURSOR_PATTERN = r"^[0-9]{13}:[0-9A-Za-z._-]{1,128}$"
_CURSOR = re.compile(CURSOR_PATTERN)
MODEL_MAX_LENGTH = 200


class JobPage(TypedDict):
    """A page of the list, as ``GET /v1/jobs`` answers it."""

    data: list[Record]
    next_cursor: str | None


def list_entry(record: Record) -> str:
    """A record's entry in the list (what the transition script indexes):
    ``<member>\\t<owner>\\t<kind>\\t<model>``."""
    created_ms = int(parse_iso(record["created_at"]).timestamp() * 1000)
    return "\t".join(
        (
            f"{created_ms:013d}:{record['id']}",
            record.get("owner") or K.NO_OWNER,
            record.get("kind") or Kind.GENERATE.value,
            record["request"]["model"],
        )
    )


def check_query(
    status: str | None, kind: str | None, model: str | None, limit: int, cursor: str | None
) -> None:
    """Raise :class:`InvalidRequest` naming every bad parameter."""
    bad = []
    if status is not None and status not in Status.__members__.values():
        bad.append({"field": "status", "message": f"one of {', '.join(Status)}"})
    if kind is not None and kind not in Kind.__members__.values():
        bad.append({"field": "kind", "message": f"one of {', '.join(Kind)}"})
    if model is not None and not 1 <= len(model) <= MODEL_MAX_LENGTH:
        bad.append({"field": "model", "message": f"1-{MODEL_MAX_LENGTH} characters"})
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        bad.append({"field": "limit", "message": f"an integer from 1 to {MAX_LIMIT}"})
    if cursor is not None and not _CURSOR.fullmatch(cursor):
        bad.append({"field": "cursor", "message": "not a cursor this list gave"})
    if bad:
        raise InvalidRequest(bad)


class Records(Protocol):
    """What the list reads through: a :class:`producer.jobs.store.JobStore` (named by this
    protocol, not imported: the store imports :func:`list_entry` from here)."""

    redis: redis.Redis

    def get(self, job_id: str) -> Record: ...


class JobList:
    """Pages of the list, read through ``store``'s Redis."""

    def __init__(self, store: Records) -> None:
        self.store = store
        self._page = store.redis.register_script(S.LIST_PAGE)

    def page(
        self,
        owner: str | None,
        *,
        status: str | None = None,
        kind: str | None = None,
        model: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> JobPage:
        """``owner``'s jobs (None: those submitted without an API key) matching the
        filters, newest first, after ``cursor``; ``next_cursor`` is None on the last page.

        Raises :class:`InvalidRequest` naming each bad parameter.
        """
        check_query(status, kind, model, limit, cursor)
        key = K.list_key(owner, status or "*", kind or "*", model or "*")
        flat: Any = self._page(keys=[key], args=[cursor or "", limit + 1, PRUNE_ON_READ])
        members = [m.decode() for m in flat[0::2]]
        records = [self._current(cast(Record, json.loads(doc))) for doc in flat[1::2]]
        more = len(records) > limit
        return {"data": records[:limit], "next_cursor": members[limit - 1] if more else None}

    def _current(self, record: Record) -> Record:
        # As JobStore.get: a queued job past its expires_at is expired on the way.
        expires_at = record.get("expires_at")
        if (
            record["status"] == Status.QUEUED
            and expires_at
            and parse_iso(expires_at) <= datetime.now(UTC)
        ):
            with contextlib.suppress(JobNotFound):
                record = self.store.get(record["id"])
        record.setdefault("kind", Kind.GENERATE)
        return record
