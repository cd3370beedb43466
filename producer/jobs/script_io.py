"""What the store's scripts (:mod:`producer.jobs.scripts`) are given and what they
answer, typed: the APPLY script's ``KEYS`` and ``ARGV``, one named field per slot in
the script's order (:class:`ApplyKeys`, :class:`ApplyArgs`, built by :func:`apply_call`),
and its replies and HOLD's parsed once into enums (:class:`Outcome`, :class:`Hold`).

The script names every slot (``local allowed = ARGV[1]``, ...) with the field's name;
a test reads those lines back, so the two orders cannot drift apart.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, fields
from typing import Any, cast

from producer.core import keys as K
from producer.core.contract import Kind, Record, Status, now_iso, parse_iso
from producer.jobs.idempotency import Claim
from producer.jobs.joblist import list_entry

NO_TOKEN = "none"
#: What APPLY's first argument is for a job that must not exist yet.
NEW = "__new__"


@dataclass
class Snapshot:
    """A job as read in one round trip; ``token`` is what a compare-and-set compares."""

    record: Record
    status: Status
    token: str
    cancel_requested: bool
    #: The worker holding the job's message (its lease), and that message's delivery tag.
    lease: str | None = None
    tag: str | None = None
    #: The attempt a ``job.retrying`` event has already announced (the reconciler's).
    announced: int = 0

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> Snapshot:
        def text(name: bytes) -> str | None:
            value = raw.get(name)
            return None if value is None else value.decode()

        return cls(
            record=cast(Record, json.loads(raw[b"doc"])),
            status=Status(raw[b"status"].decode()),
            token=raw.get(b"token", NO_TOKEN.encode()).decode(),
            cancel_requested=raw.get(b"cancel") == b"1",
            lease=text(b"lease"),
            tag=text(b"tag"),
            announced=int(raw.get(b"announced", b"0")),
        )


class HoldResult(enum.StrEnum):
    """What taking a job's message found (the HOLD script's first reply)."""

    #: Now leased to the caller: :attr:`Hold.snapshot` is the job.
    OK = "ok"
    #: Leased to another worker, :attr:`Hold.holder`.
    HELD = "held"
    #: Finished already: :attr:`Hold.found` is its terminal status.
    ENDED = "ended"
    #: No record (not written yet, or expired).
    MISSING = "__missing__"


@dataclass(frozen=True)
class Hold:
    result: HoldResult
    snapshot: Snapshot | None = None
    holder: str | None = None
    found: Status | None = None

    @classmethod
    def parse(cls, reply: list[Any]) -> Hold:
        head = reply[0].decode()
        if head == HoldResult.OK:
            flat = reply[1]
            raw = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
            return cls(HoldResult.OK, snapshot=Snapshot.from_hash(raw))
        if head == HoldResult.HELD:
            return cls(HoldResult.HELD, holder=reply[1].decode())
        if head == HoldResult.MISSING:
            return cls(HoldResult.MISSING)
        return cls(HoldResult.ENDED, found=Status(head))


class Verdict(enum.StrEnum):
    """What a compare-and-set (the APPLY script) answered."""

    #: Written: :attr:`Outcome.event_ids` are the new events' ids.
    APPLIED = "applied"
    #: This very call had already run (its reply was lost): nothing written again.
    REPLAYED = "replayed"
    #: Refused: the job is in a status not allowed (or terminal, or exists for ``NEW``):
    #: :attr:`Outcome.found`.
    STATUS = "status"
    #: Refused: no such job.
    MISSING = "__missing__"
    #: Refused: the idempotency key already names a job.
    CLAIMED = "claimed"
    #: Refused: another run owns the job (its token, or the lease, is not the caller's).
    FENCED = "fenced"
    #: Refused (a take-back): another message of the job holds its lease now.
    LEASE_CHANGED = "lease_changed"
    #: Refused (a take-back): the lease was renewed, its holder is alive.
    LEASE_RENEWED = "lease_renewed"


@dataclass(frozen=True)
class Outcome:
    detail: Verdict
    event_ids: tuple[str, ...] = ()
    #: The status the job was found in, when that refused the call.
    found: Status | None = None

    @property
    def ok(self) -> bool:
        return self.detail in (Verdict.APPLIED, Verdict.REPLAYED)

    @property
    def reason(self) -> str:
        """For log lines: the status found, else the verdict."""
        return str(self.found or self.detail)

    @classmethod
    def parse(cls, reply: list[Any]) -> Outcome:
        ok, raw = reply
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if ok:
            if text == Verdict.REPLAYED:
                return cls(Verdict.REPLAYED)
            return cls(Verdict.APPLIED, tuple(text.split(",")) if text else ())
        if text in Status.__members__.values():
            return cls(Verdict.STATUS, found=Status(text))
        return cls(Verdict(text))


@dataclass(frozen=True)
class ApplyKeys:
    """APPLY's ``KEYS``, in the script's order."""

    job_key: str
    log_key: str
    stream_key: str
    queue_key: str
    claim_key: str
    leases_key: str

    def keys(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class ApplyArgs:
    """APPLY's ``ARGV[1..15]``, in the script's order; the events follow them, three
    arguments each (:func:`producer.jobs.eventlog.event_args`)."""

    allowed: str
    token: str
    status: str
    new_token: str
    record: str
    ts: str
    ttl: int
    maxlen: int
    job_id: str
    score: int | str
    claim: str
    claim_ttl: int
    lease: str
    announce: int | str
    entry: str

    def argv(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)]


def apply_call(
    job_id: str,
    *,
    allowed: str,
    token: str,
    record: Record | None,
    new_token: str | None,
    claim: Claim | None,
    lease: str,
    requeue: Record | None,
    announce: int | None,
    result_ttl_s: int,
) -> tuple[ApplyKeys, ApplyArgs]:
    """The keys and arguments of one APPLY call (see :meth:`JobStore.apply`)."""
    status = record["status"] if record is not None else ""
    terminal = bool(status) and Status(status).is_terminal()
    index_doc = record if allowed == NEW else requeue
    keys = ApplyKeys(
        job_key=K.job_key(job_id),
        log_key=K.events_key(job_id),
        stream_key=K.GLOBAL_EVENTS,
        queue_key=K.queued_index_key(_model(record or requeue)),
        claim_key=claim.key if claim is not None else K.job_key(job_id),
        leases_key=K.LEASES,
    )
    args = ApplyArgs(
        allowed=allowed,
        token=token,
        status=status,
        new_token=new_token or "",
        record=dumps(record) if record is not None else "",
        ts=now_iso(),
        ttl=result_ttl_s if terminal else 0,
        maxlen=K.GLOBAL_EVENTS_MAXLEN,
        job_id=job_id,
        score=_queued_score(index_doc) if index_doc is not None else "",
        claim=claim.value if claim is not None else "",
        claim_ttl=claim.ttl_s if claim is not None else 0,
        lease=lease,
        announce="" if announce is None else announce,
        entry=list_entry(record) if record is not None else "",
    )
    return keys, args


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _model(record: Record | None) -> str:
    """The lane the record's job waits in (its model, or ``train.<model>``)."""
    return lane_of(record) if record else "_"


def lane_of(record: Record) -> str:
    return K.lane(record["request"]["model"], record.get("kind") or Kind.GENERATE)


def _queued_score(record: Record) -> int:
    created_ms = int(parse_iso(record["created_at"]).timestamp() * 1000)
    return K.queued_score(int(record["request"].get("priority", 5)), created_ms)
