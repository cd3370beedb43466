"""``Idempotency-Key``: a reservation written with the record it names.

A request with a key either finds the key free (its job is created, and the key is
set in the same step as the record: :meth:`producer.jobs.store.JobStore.create`), or finds
it naming a job (the same body: that job is the answer; another body: a conflict,
:meth:`producer.jobs.store.JobStore.claimed`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from producer.core import keys as K


@dataclass
class Claim:
    """An ``Idempotency-Key`` reservation written with the record it names, so that
    neither exists without the other (a replica dying between two writes would leave
    a key that names no job, and every retry with it would wait for one)."""

    key: str
    value: str
    ttl_s: int


@dataclass(frozen=True)
class IdempotencyKey:
    """An ``Idempotency-Key`` as the store keeps it: per owner (one key's ``order-42`` is
    not another's), with the fingerprint of the body it came with."""

    key: str
    owner: str | None
    fingerprint: str

    @classmethod
    def of(cls, owner: str | None, header: str, body: Any) -> IdempotencyKey:
        digest = hashlib.sha256(header.encode()).hexdigest()
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return cls(
            f"{K.IDEMPOTENCY}{owner}:{digest}",
            owner,
            hashlib.sha256(canonical.encode()).hexdigest(),
        )

    def claim(self, job_id: str, ttl_s: int) -> Claim:
        """The reservation to write with the record of ``job_id``."""
        value = json.dumps({"fingerprint": self.fingerprint, "job_id": job_id})
        return Claim(self.key, value, ttl_s)
