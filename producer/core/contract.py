"""The job contract both sides share: request, record, states, events.

Light on purpose: pydantic only. The worker imports it; it never imports the worker.
The states and the record's types are :mod:`producer.core.record`'s, named here too.
"""

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from producer.core.constraints import DISTINCT, NOT_BLANK, integral, only_with
from producer.core.normalized import GenerateRequest, NormalizedRequest
from producer.core.record import TERMINAL as TERMINAL
from producer.core.record import TERMINAL_EVENT_FOR as TERMINAL_EVENT_FOR
from producer.core.record import TERMINAL_EVENTS as TERMINAL_EVENTS
from producer.core.record import Checkpoint as Checkpoint
from producer.core.record import ErrorInfo as ErrorInfo
from producer.core.record import Event as Event
from producer.core.record import EventType as EventType
from producer.core.record import Kind as Kind
from producer.core.record import Output as Output
from producer.core.record import OutputFlags as OutputFlags
from producer.core.record import Progress as Progress
from producer.core.record import Record as Record
from producer.core.record import RecordView as RecordView
from producer.core.record import Status as Status

MAX_SEED = 2**32 - 1
#: The most denoising steps any request may ask for (a model's default must fit too).
MAX_STEPS = 150
METADATA_MAX_BYTES = 4096
DEFAULT_STRENGTH = 0.6
MAX_EXPIRES_IN_S = 30 * 24 * 3600
WEBHOOK_EVENT_NAMES = ("started", "progress", "output", "completed")
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


def terminal_event(record: Mapping[str, Any]) -> tuple[EventType, dict[str, Any]]:
    """The event that announces a finished record: the record itself, and the error."""
    data: dict[str, Any] = {"job": record}
    if record.get("error"):
        data["error"] = record["error"]
    return TERMINAL_EVENT_FOR[Status(record["status"])], data


#: Event data fields only the job's own log carries: the global stream (and so the
#: webhooks it feeds) leaves them out. A preview is a picture of a few kB, meant for
#: the job's watchers, not for every consumer of every job's events.
LOG_ONLY_FIELDS = frozenset({"preview"})


def shared_data(data: dict[str, Any]) -> dict[str, Any]:
    """An event's data as the global stream and webhooks carry it: ``data`` itself when
    it has no log-only field, else a copy without them."""
    if LOG_ONLY_FIELDS.isdisjoint(data):
        return data
    return {k: v for k, v in data.items() if k not in LOG_ONLY_FIELDS}


MAX_LORAS = 4


class LoraRef(BaseModel):
    """One LoRA adapter of a request: a registry name or ``storage:<key>``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=1024)
    scale: float = Field(default=1.0, ge=-4, le=4, allow_inf_nan=False)


MAX_CONTROLS = 2
MAX_REFERENCES = 4


class ControlRef(BaseModel):
    """One ControlNet of a request: a ``[controlnets.NAME]`` entry and its control image."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    image: str = Field(min_length=1)
    scale: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    start: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    end: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)
    #: ``canny``: the worker derives an edge map from ``image`` (OpenCV's Canny).
    preprocess: Literal["none", "canny"] = "none"


class ReferenceRef(BaseModel):
    """One IP-Adapter reference image: ``full`` (every attention layer), ``style``
    (InstantStyle's style layer only) or ``subject`` (the layout/content layer)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(min_length=1)
    scale: float = Field(default=0.6, ge=0, le=2, allow_inf_nan=False)
    mode: Literal["full", "subject", "style"] = "full"


MAX_SWEEP_IMAGES = 16
#: Sweep axes in grid order: the first one given runs along the columns, the second
#: along the rows.
SWEEP_AXES = ("seeds", "guidance_scale", "steps")


class Sweep(BaseModel):
    """A grid of generations in one job: one or two axes, every combination one image."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(
        default=None, min_length=1, max_length=MAX_SWEEP_IMAGES, json_schema_extra=DISTINCT
    )
    guidance_scale: list[Annotated[float, Field(ge=0, le=30, allow_inf_nan=False)]] | None = Field(
        default=None, min_length=1, max_length=MAX_SWEEP_IMAGES, json_schema_extra=DISTINCT
    )
    steps: list[Annotated[int, Field(ge=1, le=MAX_STEPS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_SWEEP_IMAGES, json_schema_extra=DISTINCT
    )

    @field_validator("seeds", "steps", mode="before")
    @classmethod
    def _whole(cls, v: Any) -> Any:
        return integral(v)

    @field_validator("seeds", "guidance_scale", "steps")
    @classmethod
    def _distinct(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("must not repeat a value")
        return v


def sweep_cells(request: GenerateRequest) -> list[dict[str, Any]]:
    """The grid of a normalized request, row by row: each cell's seed, steps, guidance
    and the axis values that label it. Empty for a request without a sweep."""
    sweep: Mapping[str, Any] = request.get("sweep") or {}
    if not sweep:
        return []
    axes = [a for a in SWEEP_AXES if sweep.get(a)]
    cols: list[Any] = sweep[axes[0]]
    rows: list[Any] = sweep[axes[1]] if len(axes) > 1 else [None]
    cells = []
    for y in rows:
        for x in cols:
            label = {axes[0]: x} if y is None else {axes[0]: x, axes[1]: y}
            cells.append(
                {
                    "seed": label.get("seeds", request["seed"]),
                    "steps": label.get("steps", request["steps"]),
                    "guidance_scale": float(label.get("guidance_scale", request["guidance_scale"])),
                    "label": label,
                }
            )
    return cells


def denoise_steps(request: GenerateRequest) -> int:
    """Denoising steps the whole job runs (img2img runs int(steps × strength) of them)."""

    def one(steps: int) -> int:
        return int(steps * (request["strength"] or 0)) if request.get("image") else steps

    cells = sweep_cells(request)
    if cells:
        return sum(one(c["steps"]) for c in cells)
    return one(request["steps"])


#: The integer fields of a job request (read by :func:`integral`).
_INTS = ("width", "height", "steps", "seed", "num_images", "quality", "priority")


def distinct_events(v: list[str]) -> list[str]:
    """``webhook_events`` as a request model checks it: no event named twice."""
    if len(set(v)) != len(v):
        raise ValueError("must not repeat an event")
    return v


def small_metadata(v: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` as a request model checks it: plain JSON of at most
    ``METADATA_MAX_BYTES``."""
    try:
        size = len(json.dumps(v, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be plain JSON ({exc})") from None
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"is {size} bytes as JSON; the limit is {METADATA_MAX_BYTES}")
    return v


class JobRequest(BaseModel):
    """What a producer submits. Fields the model decides are ``None`` until normalized."""

    # The schema says what the checks say of strength and mask: only with an image.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"allOf": [only_with("strength", "image"), only_with("mask", "image")]},
    )

    prompt: str = Field(min_length=1, max_length=4000, json_schema_extra=NOT_BLANK)
    negative_prompt: str = Field(default="", max_length=4000)
    model: str | None = None
    width: int | None = Field(default=None, ge=64, multiple_of=8)
    height: int | None = Field(default=None, ge=64, multiple_of=8)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0, le=30, allow_inf_nan=False)
    scheduler: str | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_images: int = Field(default=1, ge=1, le=8)
    image: str | None = None
    #: 0 is in range but never runs: img2img runs int(steps × strength) steps.
    strength: float | None = Field(
        default=None, ge=0, le=1, allow_inf_nan=False, json_schema_extra={"exclusiveMinimum": 0}
    )
    output_format: Literal["png", "webp", "jpeg"] = "png"
    quality: int = Field(default=90, ge=1, le=100)
    webhook: str | None = None
    webhook_events: list[Literal["started", "progress", "output", "completed"]] = Field(
        default_factory=lambda: ["completed"],  # type: ignore[arg-type]
        json_schema_extra=DISTINCT,
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=5, ge=0, le=9)
    timeout_s: int | None = Field(default=None, ge=1)
    expires_in_s: int | None = Field(default=None, ge=1, le=MAX_EXPIRES_IN_S)
    #: Inpainting: white pixels of the mask are repainted, black ones kept.
    mask: str | None = None
    #: LoRA adapters applied for this job only, in order.
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)
    #: A parameter grid: every combination is one image, plus a labelled contact sheet.
    sweep: Sweep | None = None
    #: Live previews: the job's ``job.progress`` events carry a small WebP of the
    #: predicted clean image (docs/features.md "Live previews").
    preview: bool = Field(
        default=False,
        description=(
            "Live previews: job.progress events carry `preview`, a data:image/webp;base64 "
            "picture of the predicted clean image (at most PREVIEW_MAX_SIDE px, one per "
            "PREVIEW_INTERVAL_S), in the job's own event stream only."
        ),
    )
    #: ControlNets steering the layout by images (edges, depth, pose), combined.
    control: list[ControlRef] = Field(default_factory=list, max_length=MAX_CONTROLS)
    #: IP-Adapter image prompts: a subject or a style carried into the picture.
    references: list[ReferenceRef] = Field(default_factory=list, max_length=MAX_REFERENCES)

    @field_validator(*_INTS, "timeout_s", "expires_in_s", mode="before")
    @classmethod
    def _whole(cls, v: Any) -> Any:
        return integral(v)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("webhook_events")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return distinct_events(v)

    @field_validator("metadata")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        return small_metadata(v)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def is_expired(record: Mapping[str, Any], now: datetime | None = None) -> bool:
    """Past the record's ``expires_at`` (a queued job that ran out of time to start)."""
    if not record.get("expires_at"):
        return False
    return (now or datetime.now(UTC)) >= parse_iso(record["expires_at"])


def new_record(
    job_id: str,
    request: NormalizedRequest,
    created_at: str,
    owner: str | None = None,
    kind: Kind = Kind.GENERATE,
) -> Record:
    expires_at = None
    if expires_in_s := request.get("expires_in_s"):
        ts = parse_iso(created_at).timestamp() + expires_in_s
        expires_at = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
        expires_at = expires_at.replace("+00:00", "Z")
    return {
        "id": job_id,
        "kind": kind,
        "status": Status.QUEUED,
        "request": request,
        "created_at": created_at,
        "started_at": None,
        "finished_at": None,
        "expires_at": expires_at,
        "attempts": 0,
        "worker": None,
        "progress": {
            "step": 0,
            "total": request["steps"] if kind == Kind.TRAIN else denoise_steps(cast(Any, request)),
        },
        "outputs": [],
        "error": None,
        "timings": {},
        "metadata": request.get("metadata", {}),
        "owner": owner,
    }
