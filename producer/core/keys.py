"""Every Redis key atelier writes, in one place.

Celery's own keys (one list per queue and priority, ``unacked``, ``unacked_index``)
are named by kombu; :func:`queue_name` gives the queue for a model.
"""

from producer.core.record import Kind

PREFIX = "atelier"

#: How long a finished job's keys (record, event log, inline inputs, deliveries) live by
#: default: ``Settings.result_ttl_s``, and the store's when no settings are at hand.
RESULT_TTL_S = 7 * 24 * 3600

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

#: Sorted set per model of its jobs waiting for a worker (``queued``, or ``running`` jobs
#: taken back from a lost worker until their next run starts), scored so that ZRANK is
#: the position in the queue: higher priority first, then oldest first (what Celery's
#: Redis transport serves). Maintained by the store's transition script.
QUEUED_INDEX = f"{PREFIX}:queued:"
#: The job list (``GET /v1/jobs``, producer/jobs/joblist.py): per owner, one sorted set for
#: every combination of the filters (status, kind, model; ``*`` for any), so that no
#: filter scans. ``list_key(owner, status, kind, model)``. Every member has score 0 and
#: is ``<created_ms, 13 digits>:<job id>``, so that lexical order is creation order
#: and a page is one ZRANGE BYLEX from its cursor. Maintained by the store's transition
#: script in the step that changes the status.
JOB_LIST = f"{PREFIX}:list:"
#: Sorted set of the list entries of finished jobs, scored by when their record expires
#: (ms, Redis time): each member says which sets to leave (``<status>\t<entry>``).
#: Pruned as records expire, a few at each terminal transition and more at each read,
#: so that the list never outlives the records.
JOB_LIST_EXPIRY = f"{PREFIX}:list-expiry"
#: Owner part of :data:`JOB_LIST` keys for jobs submitted with no API key (the client).
NO_OWNER = "_"
#: Per-job list of webhook delivery attempts (JSON), newest last.
DELIVERIES = f"{PREFIX}:deliveries:"
#: Most delivery attempts kept per job.
DELIVERIES_KEPT = 100
#: Consumer group of the webhook dispatchers on :data:`GLOBAL_EVENTS`.
DISPATCH_GROUP = "atelier-dispatchers"
#: Sorted set of webhook deliveries waiting for a retry, scored by due time (ms).
WEBHOOK_RETRIES = f"{PREFIX}:webhooks:retry"
#: Per-API-key rate limiter state (GCRA: the theoretical arrival time).
RATE_LIMIT = f"{PREFIX}:ratelimit:"
#: Per API process: a stream its event reader also reads, so that appending to it wakes
#: the reader's blocked XREAD when the set of watched jobs changes (producer/api/hub.py).
SSE_WAKE = f"{PREFIX}:sse:wake:"
#: ``Idempotency-Key`` reservations, per API key.
IDEMPOTENCY = f"{PREFIX}:idem:"
#: Worker heartbeats: one JSON string per worker, expiring unless refreshed.
WORKER = f"{PREFIX}:worker:"
#: Sorted set of worker ids by last heartbeat (ms), to list them without SCAN.
WORKERS = f"{PREFIX}:workers"

#: Sorted set of job leases: job id -> expiry (ms, Redis time). A job is leased from the
#: moment a worker takes its message until it ends or is given back; the worker's
#: heartbeat renews it. The holder is in the job's hash (``lease``: worker, ``tag``:
#: the message's delivery tag). An expired lease is taken back by the reconciler.
LEASES = f"{PREFIX}:leases"
#: The reconciler's lock: whoever sets it runs the next pass (one process fleet-wide).
RECONCILE_LOCK = f"{PREFIX}:reconcile:lock"
#: Set after a look for a long queue's lost messages, so that it is read at most once
#: per ``reconcile_grace_s``.
RECONCILE_SCAN = f"{PREFIX}:reconcile:scan:"

#: What the reconciler counts (``atelier_reconciled_total{reason}``): a lost worker's
#: job taken back, one out of attempts ended ``worker_lost``, a lost message re-published
#: or restored, a dead dispatcher's consumer removed.
RECONCILE_REASONS = ("lease_expired", "worker_lost", "message_lost", "dispatcher_consumer")

#: kombu's Redis transport: messages taken and not acknowledged (delivery tag -> JSON
#: ``[payload, exchange, routing_key]``), and when each was taken (tag -> unix time).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"

#: Celery task names, one per kind of job: the message body is ``[job_id]``; the record
#: holds the request.
TASK_GENERATE = "atelier.generate"
TASK_TRAIN = "atelier.train"
TASKS = (TASK_GENERATE, TASK_TRAIN)
QUEUE_PREFIX = "atelier."
#: A model's trainings wait in a lane of their own, ``train.<model>`` (queue
#: ``atelier.train.<model>``), consumed only by workers started with ``--train``.
TRAIN_LANE = "train."


def lane(model: str, kind: Kind = Kind.GENERATE) -> str:
    """Where a job of ``kind`` for ``model`` waits: the model's name for generations,
    ``train.<model>`` for trainings. Queues, queue lists and the queued index are per
    lane (a registry name never starts with ``train.``)."""
    return TRAIN_LANE + model if kind == Kind.TRAIN else model


def task_of(lane_name: str) -> str:
    """The Celery task a lane's messages name."""
    return TASK_TRAIN if lane_name.startswith(TRAIN_LANE) else TASK_GENERATE


def job_key(job_id: str) -> str:
    return JOB + job_id


def events_key(job_id: str) -> str:
    return JOB_EVENTS + job_id


def cancel_key(job_id: str) -> str:
    return JOB_CANCEL + job_id


def input_key(sha256: str) -> str:
    return INPUT + sha256


def queued_index_key(model: str) -> str:
    return QUEUED_INDEX + model


#: Width of one priority band of :data:`QUEUED_INDEX` scores (above any ms timestamp).
QUEUED_BAND = 10**13


def queued_score(priority: int, created_ms: int) -> int:
    """Score in :func:`queued_index_key`: priority bands, oldest first within one."""
    return (9 - priority) * QUEUED_BAND + created_ms


def list_key(owner: str | None, status: str = "*", kind: str = "*", model: str = "*") -> str:
    """One set of the job list: ``owner``'s jobs (None: the client's) with this status,
    kind and model (``*``: any). The model goes last: a registry name may hold ``:``."""
    return f"{JOB_LIST}{owner or NO_OWNER}:{status}:{kind}:{model}"


def deliveries_key(job_id: str) -> str:
    return DELIVERIES + job_id


def worker_key(worker_id: str) -> str:
    return WORKER + worker_id


def queue_name(model: str) -> str:
    """One Celery queue per model (per lane: see :func:`lane`), so a worker consumes only
    what it has loaded."""
    return QUEUE_PREFIX + model


def queue_keys(model: str) -> list[str]:
    """The Redis lists Celery's transport keeps a model's messages in, one per priority
    (``priority_steps`` 0–9, separator ``:``): a queue's depth is the sum of their
    lengths. ``atelier.<model>`` holds Celery priority 0 (atelier priority 9)."""
    q = queue_name(model)
    return [q] + [f"{q}:{i}" for i in range(1, 10)]
