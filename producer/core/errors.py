"""atelier's exception tree.

Every class knows the error code a user sees and whether the job may be tried again::

    AtelierError
    ├── InvalidRequest            invalid_request   a refused request; ``fields`` names each bad one
    │   └── UnknownModel          unknown_model
    ├── JobNotFound               (no job with that id)
    ├── Unavailable               (Redis or the broker unreachable; retryable)
    ├── KeyClaimed                (an Idempotency-Key already names another job)
    ├── IdempotencyConflict       idempotency_conflict   (the key came with another body)
    └── JobError                  raised while a job runs; ends it ``failed`` with ``code``
        ├── ImageFetchFailed      image_fetch_failed
        ├── ImageInvalid          image_invalid
        ├── OutOfMemory           out_of_memory
        ├── JobTimeout            timeout
        ├── WorkerLost            worker_lost
        ├── StorageUnavailable    storage_unavailable   (retryable)
        ├── InvalidLora           invalid_request   (a LoRA unreadable or unfit, seen at run time)
        └── InternalError         internal

Control flow that is not a failure lives beside it: :class:`JobCancelled` (the user
asked), :class:`Fenced` (another run of the same job owns it now, so this run's
writes must stop) and :class:`GiveBack` (the worker is shutting down before the job
started: its message goes back to the queue).
"""

from __future__ import annotations

from producer.core.contract import ErrorInfo


class AtelierError(Exception):
    code = "internal"
    retryable = False


class InvalidRequest(AtelierError):
    """A request was refused. ``fields``: ``[{"field": "width", "message": "..."}]``."""

    code = "invalid_request"

    def __init__(self, fields: list[dict[str, str]], message: str | None = None) -> None:
        self.fields = fields
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        super().__init__(message or f"invalid request: {summary}")


class UnknownModel(InvalidRequest):
    code = "unknown_model"


class JobNotFound(AtelierError):
    code = "not_found"

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


class JobError(AtelierError):
    """A job failed; the record's ``error`` gets ``{code, message}``."""

    def to_error(self) -> ErrorInfo:
        return {"code": self.code, "message": str(self)}


class ImageFetchFailed(JobError):
    code = "image_fetch_failed"


class ImageInvalid(JobError):
    code = "image_invalid"


class OutOfMemory(JobError):
    code = "out_of_memory"


class JobTimeout(JobError):
    code = "timeout"


class WorkerLost(JobError):
    code = "worker_lost"


class StorageUnavailable(JobError):
    code = "storage_unavailable"
    retryable = True


class InvalidLora(JobError):
    """A requested LoRA could not be read or does not fit the model (found by the worker:
    a storage key is only read there)."""

    code = "invalid_request"


class InternalError(JobError):
    code = "internal"


class JobCancelled(AtelierError):
    """The user cancelled the job; raised from the step callback to stop denoising."""

    code = "cancelled"


class Fenced(AtelierError):
    """This run no longer owns the job (another attempt took over, or it ended)."""

    code = "fenced"


class GiveBack(AtelierError):
    """The worker is shutting down and this job has not started: the task puts its
    message back on the queue for another worker, instead of running it here."""

    code = "shutting_down"


class KeyClaimed(AtelierError):
    """A concurrent request with the same ``Idempotency-Key`` created its job first."""

    code = "idempotency_claimed"


class IdempotencyConflict(AtelierError):
    """An ``Idempotency-Key`` already used with a different request body."""

    code = "idempotency_conflict"


class Unavailable(AtelierError):
    """A dependency (Redis, the broker) could not be reached; nothing was enqueued."""

    code = "unavailable"
    retryable = True


class JobEndedFailed(AtelierError):
    """The job ended ``failed`` and its outcome is recorded on the job. The Celery task
    raises this afterwards so that its task state (task events, Flower) reads FAILURE;
    the message is acknowledged all the same (``task_acks_on_failure_or_timeout``)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} ended failed; its record holds the error")
