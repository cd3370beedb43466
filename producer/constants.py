"""Every Redis key atelier writes, in one place.

Celery's own keys (one list per queue and priority, ``unacked``, ``unacked_index``)
are named by kombu; :func:`queue_name` gives the queue for a model.
"""

PREFIX = "atelier"

#: Hash holding a job: ``status``, ``token`` (the fence of the current run) and ``doc``
#: (the whole record as JSON). ``job_key(id)``.
JOB = f"{PREFIX}:job:"
#: Per-job event log (a Redis stream). ``events_key(id)``.
JOB_EVENTS = f"{PREFIX}:events:"
#: List a running job's monitor blocks on; a cancel request pushes to it.
JOB_CANCEL = f"{PREFIX}:cancel:"
#: Init images given inline (data: URIs), by sha256 of their bytes: the record keeps
#: ``sha256:<hex>`` instead of megabytes of base64 it would rewrite at every step.
INPUT = f"{PREFIX}:input:"
#: Global event stream that feeds the webhook dispatcher.
GLOBAL_EVENTS = f"{PREFIX}:events"
#: Approximate cap of the global stream (XADD MAXLEN ~).
GLOBAL_EVENTS_MAXLEN = 100_000

#: Celery task name: the message body is ``[job_id]``; the record holds the request.
TASK_GENERATE = "atelier.generate"
QUEUE_PREFIX = "atelier."


def job_key(job_id: str) -> str:
    return JOB + job_id


def events_key(job_id: str) -> str:
    return JOB_EVENTS + job_id


def cancel_key(job_id: str) -> str:
    return JOB_CANCEL + job_id


def input_key(sha256: str) -> str:
    return INPUT + sha256


def queue_name(model: str) -> str:
    """One Celery queue per model, so a worker consumes only what it has loaded."""
    return QUEUE_PREFIX + model
