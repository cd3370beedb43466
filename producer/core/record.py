"""The job's states and its record, typed: statuses, kinds and event types (enums),
the record, its outputs and its events (TypedDicts). Part of the contract
(:mod:`producer.core.contract` re-exports every name here).

No ``from __future__ import annotations`` here: the TypedDicts below must see their
``NotRequired`` fields at class creation (``__optional_keys__``), which string
annotations hide on Python 3.11.
"""

import enum
from typing import Annotated, Any, NotRequired

from pydantic import Field

# pydantic reads TypedDicts (for the API's schema) only from typing_extensions before 3.12
from typing_extensions import TypedDict

from producer.core.normalized import RecordRequest


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.EXPIRED})


class Kind(enum.StrEnum):
    """What a job does: every kind shares the lifecycle. A record
    written before kinds existed has none and is a ``generate`` job."""

    GENERATE = "generate"
    TRAIN = "train"


class EventType(enum.StrEnum):
    QUEUED = "job.queued"
    STARTED = "job.started"
    PROGRESS = "job.progress"
    OUTPUT = "job.output"
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"
    EXPIRED = "job.expired"
    RETRYING = "job.retrying"
    CHECKPOINT = "job.checkpoint"


TERMINAL_EVENTS = frozenset(
    {EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED, EventType.EXPIRED}
)
#: Which terminal event a terminal status emits.
TERMINAL_EVENT_FOR = {
    Status.SUCCEEDED: EventType.SUCCEEDED,
    Status.FAILED: EventType.FAILED,
    Status.CANCELLED: EventType.CANCELLED,
    Status.EXPIRED: EventType.EXPIRED,
}


# -- the record, its outputs, its events ---------------------------------------------
# Typed once here; new_record, the worker's outputs and the API's response models use
# these, so the wire cannot drift. TypedDicts, not models: the store and the wire carry
# plain JSON, and the JSON on the wire is exactly these dicts.


class Progress(TypedDict):
    step: int
    total: int


class ErrorInfo(TypedDict):
    code: str
    message: str


class OutputFlags(TypedDict, total=False):
    """What an output may add: the safety checker's verdict, a sweep cell's values."""

    nsfw: Annotated[bool, Field(description="set when a safety checker ran")]
    blurred: bool
    withheld: bool
    sweep: Annotated[dict[str, Any], Field(description="a sweep cell's values")]
    contact_sheet: bool
    adapter: Annotated[bool, Field(description="a training's adapter.safetensors")]


class Output(OutputFlags):
    """A stored image. ``key``, ``url``, ``content_type`` and ``sha256`` are null for a
    withheld one."""

    index: int
    key: str | None
    url: str | None
    seed: Annotated[int | None, Field(description="null for a sweep's contact sheet")]
    width: int
    height: int
    content_type: str | None
    bytes: int
    sha256: str | None


class _RecordFields(TypedDict):
    id: str
    kind: Kind
    status: Status
    request: RecordRequest
    created_at: str
    started_at: str | None
    finished_at: str | None
    expires_at: str | None
    attempts: int
    worker: str | None
    progress: Progress
    outputs: list[Output]
    error: ErrorInfo | None
    timings: dict[str, int]
    metadata: dict[str, Any]


class Checkpoint(TypedDict):
    step: int
    key: str


class Record(_RecordFields):
    """A job as the store keeps it."""

    #: The API key (its id, never the key) that submitted the job; None from the
    #: Python client. Only that key sees the job through the HTTP API.
    owner: str | None
    #: A training's: its newest checkpoint, the steps of those kept, and the step its
    #: attempt resumed from.
    checkpoint: NotRequired[Checkpoint]
    checkpoints: NotRequired[list[int]]
    resumed_from_step: NotRequired[int]


class RecordView(_RecordFields):
    """A job as the HTTP API shows it: the record less its owner, with its place in the
    queue and its webhook deliveries."""

    position: NotRequired[
        Annotated[
            int | None,
            Field(description="While queued: how many jobs of the same model run before it."),
        ]
    ]
    webhook_deliveries: Annotated[
        list[dict[str, Any]], Field(description="Webhook delivery attempts, oldest first.")
    ]


class Event(TypedDict):
    """One entry of a job's event stream (``atelier:events:<id>``), as SSE, webhooks and
    ``JobStore.events`` give it."""

    id: str
    type: EventType
    job_id: str
    ts: str
    data: dict[str, Any]
