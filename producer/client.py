"""The Python client a web backend uses: submit, get, list, wait, events, cancel."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import redis

from producer.core import keys as K
from producer.core.contract import Event, Kind, Record, Status, new_record, now_iso
from producer.core.errors import JobNotFound, KeyClaimed, Unavailable
from producer.core.images import decode_data_uri
from producer.core.registry import Registry
from producer.core.settings import Settings, get_settings
from producer.jobs.broker import make_celery, send_job
from producer.jobs.eventlog import carried_record
from producer.jobs.joblist import DEFAULT_LIMIT, JobList, JobPage
from producer.jobs.store import Claim, JobStore, Verdict
from producer.requests.generate import validate_request


def new_job_id() -> str:
    """32 hex characters: milliseconds first, so ids sort by creation time."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


class Client:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        registry: Registry | None = None,
        store: JobStore | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.registry = registry or Registry.load(self.settings.models_file)
        self.store = store or JobStore.from_url(self.settings.redis_url, self.settings.result_ttl_s)
        self.celery = make_celery(self.settings, "atelier-producer")
        self.jobs = JobList(self.store)

    def submit(self, request: dict[str, Any] | None = None, **fields: Any) -> str:
        """Validate, record and enqueue a job; return its id.

        Raises :class:`~producer.core.errors.InvalidRequest` (nothing written) or
        :class:`~producer.core.errors.Unavailable` (nothing left behind).
        """
        data: Any = request if request is not None and not fields else {**(request or {}), **fields}
        normalized = validate_request(data, self.registry, self.settings)
        from producer.requests.adapters import check_job_loras

        check_job_loras(normalized, self.store)
        return self.enqueue(normalized)

    def train(self, request: dict[str, Any] | None = None, **fields: Any) -> str:
        """Validate, record and enqueue a training (DreamBooth LoRA); return its id.

        Its adapter, once it succeeds, is ``job:<id>`` in a generation's ``loras``.
        Raises as :meth:`submit` does.
        """
        from producer.requests.train import validate_training

        data: Any = request if request is not None and not fields else {**(request or {}), **fields}
        normalized = validate_training(data, self.registry, self.settings)
        return self.enqueue(normalized, kind=Kind.TRAIN)

    def enqueue(
        self,
        normalized: dict[str, Any],
        job_id: str | None = None,
        owner: str | None = None,
        claim: Claim | None = None,
        kind: Kind = Kind.GENERATE,
    ) -> str:
        """Send the message, then write the record.

        In this order a failure in between leaves a message without a record, which
        the worker drops, and never a record without a message, which would stay
        ``queued`` forever. The worker waits briefly for a record it does not see yet.
        ``claim``, an idempotency key, is written with the record, in one step; if it
        already exists nothing is written and :class:`KeyClaimed` is raised.
        """
        job_id = job_id or new_job_id()
        try:
            normalized = self._stash_inline_image(normalized)
        except redis.RedisError as exc:
            raise Unavailable(f"job store unavailable: {exc}") from exc
        record = new_record(job_id, normalized, now_iso(), owner, kind)
        try:
            send_job(self.celery, job_id, K.lane(normalized["model"], kind), normalized["priority"])
        except Exception as exc:
            raise Unavailable(f"broker unavailable: {exc}") from exc
        try:
            # Refused only for a taken key, or if a lost reply hid our own write.
            out = self.store.create(record, claim)
        except redis.RedisError as exc:
            # The script may have run and only its reply been lost: look.
            try:
                self.store.load(job_id)
                return job_id
            except (redis.RedisError, JobNotFound):
                raise Unavailable(f"job store unavailable: {exc}") from exc
        if out.detail is Verdict.CLAIMED:
            # Our message finds no record and is dropped by the worker that takes it.
            raise KeyClaimed(f"the idempotency key already names a job ({job_id} not created)")
        return job_id

    def _stash_inline_image(self, normalized: dict[str, Any]) -> dict[str, Any]:
        """Keep ``data:`` input images (init image, mask, control and reference images)
        beside the record, by their sha256."""

        def stash(src: Any) -> Any:
            if isinstance(src, str) and src.startswith("data:"):
                raw = decode_data_uri(src, self.settings.max_image_bytes)
                return f"sha256:{self.store.put_input(raw)}"
            return src

        out = dict(normalized)
        if isinstance(normalized.get("images"), list):  # a training's images (and zip)
            out["images"] = [
                self._stash_training_image(src) if src.startswith("data:") else src
                for src in normalized["images"]
            ]
            return out
        for name in ("image", "mask"):
            if normalized.get(name):
                out[name] = stash(normalized[name])
        for name in ("control", "references"):
            if normalized.get(name):
                out[name] = [{**e, "image": stash(e["image"])} for e in normalized[name]]
        return out

    def _stash_training_image(self, src: str) -> str:
        """``sha256:<hex>`` of an inline training image, ``sha256:<hex>.zip`` of a zip."""
        from producer.core.train_contract import is_zip_source

        digest = self.store.put_input(_inline_bytes(src, self.settings))
        return f"sha256:{digest}" + (".zip" if is_zip_source(src) else "")

    def get(self, job_id: str) -> Record:
        return self.store.get(job_id)

    def list(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        model: str | None = None,
        kind: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> JobPage:
        """A page of jobs, newest first: ``{"data": [records], "next_cursor"}``; pass
        ``next_cursor`` as ``cursor`` for the next page (None: this was the last).

        ``owner``: whose jobs: None, those submitted without an API key (this client's);
        an API key's id (:func:`producer.api.key_id`) for that key's. Filters: ``status``,
        ``model``, ``kind``; ``limit`` 1-100. Raises
        :class:`~producer.core.errors.InvalidRequest` naming each bad parameter.
        """
        return self.jobs.page(
            owner, status=status, model=model, kind=kind, limit=limit, cursor=cursor
        )

    def events(
        self, job_id: str, after: str | None = None, timeout: float | None = None
    ) -> Iterator[Event]:
        """The job's events in order, from the start or after event id ``after``,
        until the terminal one. Resume with the last id seen."""
        return self.store.follow(job_id, after=after, timeout_s=timeout)

    def wait(self, job_id: str, timeout: float | None = None) -> Record:
        """Block until the job is terminal and return its record."""
        last: Event | None = None
        for event in self.store.follow(job_id, timeout_s=timeout):
            last = event
        # The terminal event carries the record as that transition wrote it, and a
        # terminal record never changes: no second round trip.
        job = carried_record(last) if last is not None else None
        if job is not None and Status(job.get("status", Status.QUEUED)).is_terminal():
            return job
        record = self.store.get(job_id)
        if not Status(record["status"]).is_terminal():  # the log was trimmed or expired
            raise TimeoutError(f"job {job_id} is still {record['status']}")
        return record

    def cancel(self, job_id: str) -> Record:
        """Ask for cancellation and return the record as it stands (a running job
        becomes ``cancelled`` at its next denoising step; ``wait`` for it)."""
        return self.store.request_cancel(job_id).record

    def close(self) -> None:
        self.store.redis.close()
        self.celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _inline_bytes(src: str, settings: Settings) -> bytes:
    from producer.core.train_contract import is_zip_source
    from producer.requests.train import decode_zip_uri

    if is_zip_source(src):
        return decode_zip_uri(src, settings.train_zip_max_bytes)
    return decode_data_uri(src, settings.max_image_bytes)
