"""The Python client a web backend uses: submit, get, list, wait, events, cancel."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from typing import Any

from producer.core.contract import Event, Kind, Record, Status
from producer.core.normalized import NormalizedRequest
from producer.core.registry import Registry
from producer.core.settings import Settings, get_settings
from producer.jobs.broker import make_celery
from producer.jobs.eventlog import carried_record
from producer.jobs.idempotency import IdempotencyKey
from producer.jobs.intake import Admission, Intake, IntakeResult, new_job_id
from producer.jobs.joblist import DEFAULT_LIMIT, JobList, JobPage
from producer.jobs.store import JobStore
from producer.requests.generate import validate_request

__all__ = ["Client", "new_job_id"]


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
        self.intake = Intake(self.store, self.celery, self.settings)

    def submit(self, request: dict[str, Any] | None = None, **fields: Any) -> str:
        """Validate, record and enqueue a job; return its id.

        Raises :class:`~producer.core.errors.InvalidRequest` (nothing written) or
        :class:`~producer.core.errors.Unavailable` (nothing left behind).
        """
        data: Any = request if request is not None and not fields else {**(request or {}), **fields}
        return self.take(data, Kind.GENERATE).job_id

    def train(self, request: dict[str, Any] | None = None, **fields: Any) -> str:
        """Validate, record and enqueue a training (DreamBooth LoRA); return its id.

        Its adapter, once it succeeds, is ``job:<id>`` in a generation's ``loras``.
        Raises as :meth:`submit` does.
        """
        data: Any = request if request is not None and not fields else {**(request or {}), **fields}
        return self.take(data, Kind.TRAIN).job_id

    def take(
        self,
        data: Any,
        kind: Kind,
        *,
        owner: str | None = None,
        key: IdempotencyKey | None = None,
        admission: Admission | None = None,
        check_owner: bool = False,
    ) -> IntakeResult:
        """Validate ``data`` as a job of ``kind`` and create it through
        :class:`~producer.jobs.intake.Intake`: what :meth:`submit`, :meth:`train` and the
        HTTP API's job-making routes all call.

        ``owner``: the API key's id (None: this client's jobs); with ``check_owner``, a
        generation's ``job:`` LoRAs must be that owner's trainings. ``key`` and
        ``admission``: see :meth:`Intake.take <producer.jobs.intake.Intake.take>`.
        Raises :class:`~producer.core.errors.InvalidRequest` (nothing written) and what
        ``Intake.take`` raises.
        """
        normalized = self.normalize(data, kind, owner, check_owner)
        return self.intake.take(normalized, kind, owner=owner, key=key, admission=admission)

    def normalize(
        self, data: Any, kind: Kind, owner: str | None = None, check_owner: bool = False
    ) -> NormalizedRequest:
        """``data`` checked as a request of ``kind`` and normalised (nothing written)."""
        if kind is Kind.TRAIN:
            from producer.requests.train import validate_training

            return validate_training(data, self.registry, self.settings)
        normalized = validate_request(data, self.registry, self.settings)
        from producer.requests.adapters import check_job_loras

        # loras: job:<training id>: a training that succeeded (through the API, the
        # caller's own).
        check_job_loras(normalized, self.store, owner, check_owner=check_owner)
        return normalized

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

    def models(self) -> builtins.list[dict[str, Any]]:
        """The registry's models as ``GET /v1/models`` lists them: each one's defaults and
        limits, and the ControlNets, reference modes and LoRAs its requests may name."""
        return [self.registry.view(spec) for spec in self.registry]

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
