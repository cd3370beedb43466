"""Intake: the one write path of a new job, for the Python client and the HTTP API alike.

It takes a request already validated and normalised (by :mod:`producer.requests`, through
:meth:`producer.client.Client.take`) and, in order:

1. an ``Idempotency-Key`` that already names a job answers with that job (the same body),
   or is refused (:class:`~producer.core.errors.IdempotencyConflict`, another body);
2. admission, when asked for: a lane whose queue holds ``limit`` messages refuses the job
   (:class:`QueueFull`), nothing written;
3. a new job id; inline input images kept beside the record, by their sha256;
4. the broker message sent, *then* the record written (with the key's claim, in one step).

In that order a failure between 4's two writes leaves a message without a record, which
the worker drops, and never a record without a message, which would stay ``queued``
forever. The worker waits briefly for a record it does not see yet.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis
from celery import Celery

from producer.core import keys as K
from producer.core.contract import Kind, Record, new_record, now_iso
from producer.core.errors import AtelierError, JobNotFound, KeyClaimed, Unavailable
from producer.core.images import decode_data_uri
from producer.core.normalized import GenerateRequest, NormalizedRequest, TrainingRequest
from producer.core.settings import Settings
from producer.core.train_contract import decode_zip_uri, is_zip_source
from producer.jobs.broker import queue_depth, send_job
from producer.jobs.idempotency import Claim, IdempotencyKey
from producer.jobs.store import JobStore, Verdict

__all__ = ["Admission", "Intake", "IntakeResult", "QueueFull", "new_job_id"]


def new_job_id() -> str:
    """32 hex characters: milliseconds first, so ids sort by creation time."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


class QueueFull(AtelierError):
    """A lane's queue holds ``limit`` messages or more: the job is refused, nothing
    written (the API answers 503 ``queue_full`` with ``Retry-After``)."""

    code = "queue_full"

    def __init__(self, lane: str, depth: int, limit: int) -> None:
        self.lane, self.depth, self.limit = lane, depth, limit
        super().__init__(f"the queue of {lane} holds {depth} jobs (limit {limit})")


@dataclass(frozen=True)
class Admission:
    """Admission control: refuse a job while its lane's queue (on ``broker``, the broker's
    Redis) holds ``limit`` messages; ``limit`` 0 admits everything."""

    broker: Any
    limit: int

    def check(self, lane: str) -> None:
        if not self.limit:
            return
        depth = queue_depth(self.broker, lane)
        if depth >= self.limit:
            raise QueueFull(lane, depth, self.limit)


@dataclass(frozen=True)
class IntakeResult:
    """A job taken in: its id, and the record of the job an earlier request with the same
    ``Idempotency-Key`` made (``replay``; None when this request created the job)."""

    job_id: str
    replay: Record | None = None


class Intake:
    """Creates jobs: see the module's docstring for the steps and their order."""

    def __init__(self, store: JobStore, celery: Celery, settings: Settings) -> None:
        self.store = store
        self.celery = celery
        self.settings = settings

    def take(
        self,
        request: NormalizedRequest,
        kind: Kind,
        *,
        owner: str | None = None,
        key: IdempotencyKey | None = None,
        admission: Admission | None = None,
    ) -> IntakeResult:
        """Create a job of ``kind`` running ``request`` for ``owner``.

        Raises :class:`~producer.core.errors.IdempotencyConflict` (``key`` came with
        another body), :class:`QueueFull`, :class:`~producer.core.errors.Unavailable`
        (nothing left behind but, perhaps, a message the worker drops) and
        :class:`~producer.core.errors.KeyClaimed` (a concurrent request with ``key`` is
        creating its job and has not written it yet).
        """
        if key is not None and (replay := self.store.claimed(key)) is not None:
            return IntakeResult(replay["id"], replay)
        if admission is not None:
            admission.check(K.lane(request["model"], kind))
        job_id = new_job_id()
        # The key is written with the record, in one step: a process that dies before
        # that leaves the key free, so the client's retry creates the job.
        claim = key.claim(job_id, self.settings.idempotency_ttl_s) if key is not None else None
        try:
            self._publish_then_record(request, kind, job_id, owner, claim)
        except KeyClaimed:
            # A concurrent request with this key won the race: answer with its job.
            replay = self.store.claimed(key) if key is not None else None
            if replay is None:
                raise
            return IntakeResult(replay["id"], replay)
        return IntakeResult(job_id)

    def _publish_then_record(
        self,
        request: NormalizedRequest,
        kind: Kind,
        job_id: str,
        owner: str | None,
        claim: Claim | None,
    ) -> None:
        """Send the message, then write the record (the module's docstring says why).
        ``claim`` is written with the record; if its key exists already nothing is
        written and :class:`KeyClaimed` is raised."""
        try:
            request = self._stash_inline_images(request, kind)
        except redis.RedisError as exc:
            raise Unavailable(f"job store unavailable: {exc}") from exc
        record = new_record(job_id, request, now_iso(), owner, kind)
        try:
            send_job(self.celery, job_id, K.lane(request["model"], kind), request["priority"])
        except Exception as exc:
            raise Unavailable(f"broker unavailable: {exc}") from exc
        try:
            # Refused only for a taken key, or if a lost reply hid our own write.
            out = self.store.create(record, claim)
        except redis.RedisError as exc:
            # The script may have run and only its reply been lost: look.
            try:
                self.store.load(job_id)
                return
            except (redis.RedisError, JobNotFound):
                raise Unavailable(f"job store unavailable: {exc}") from exc
        if out.detail is Verdict.CLAIMED:
            # Our message finds no record and is dropped by the worker that takes it.
            raise KeyClaimed(f"the idempotency key already names a job ({job_id} not created)")

    def _stash_inline_images(self, request: NormalizedRequest, kind: Kind) -> NormalizedRequest:
        """``data:`` input images kept beside the record, by their sha256: a training's
        images (and zip); a generation's init image, mask, control and reference images."""
        if kind is Kind.TRAIN:
            training = cast(TrainingRequest, dict(request))
            training["images"] = [
                self._stash_training_image(src) if src.startswith("data:") else src
                for src in training["images"]
            ]
            return training
        return _stash_generation(cast(GenerateRequest, request), self._stash_image)

    def _stash_image(self, src: str) -> str:
        """``sha256:<hex>`` of an inline image; any other source as it is."""
        if src.startswith("data:"):
            raw = decode_data_uri(src, self.settings.max_image_bytes)
            return f"sha256:{self.store.put_input(raw)}"
        return src

    def _stash_training_image(self, src: str) -> str:
        """``sha256:<hex>`` of an inline training image, ``sha256:<hex>.zip`` of a zip."""
        if is_zip_source(src):
            raw = decode_zip_uri(src, self.settings.train_zip_max_bytes)
        else:
            raw = decode_data_uri(src, self.settings.max_image_bytes)
        return f"sha256:{self.store.put_input(raw)}" + (".zip" if is_zip_source(src) else "")


def _stash_generation(request: GenerateRequest, stash: Callable[[str], str]) -> GenerateRequest:
    """A copy of ``request`` whose input images went through ``stash``."""
    out = cast(GenerateRequest, dict(request))
    if image := request.get("image"):
        out["image"] = stash(image)
    if mask := request.get("mask"):
        out["mask"] = stash(mask)
    if request.get("control"):
        out["control"] = [{**e, "image": stash(e["image"])} for e in request["control"]]
    if request.get("references"):
        out["references"] = [{**e, "image": stash(e["image"])} for e in request["references"]]
    return out
