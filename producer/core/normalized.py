"""The normalised request, typed: what validation returns, what a record's ``request``
holds and what the worker reads.

:func:`producer.requests.generate.validate_request` returns a :class:`GenerateRequest`,
:func:`producer.requests.train.validate_training` a :class:`TrainingRequest`; each key
below is one their normalisation writes, with the type it has there. The JSON is the
same dict: these only name its keys and types for the type checker.

No ``from __future__ import annotations`` here: the TypedDicts must see their
``NotRequired`` keys at class creation (``__optional_keys__``), which string annotations
hide on Python 3.11.
"""

from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypeAlias

from typing_extensions import TypedDict

__all__ = [
    "ControlEntry",
    "GenerateRequest",
    "LoraEntry",
    "NormalizedRequest",
    "RecordRequest",
    "ReferenceEntry",
    "SweepAxes",
    "TrainingRequest",
]

OutputFormat: TypeAlias = Literal["png", "webp", "jpeg"]
WebhookEventName: TypeAlias = Literal["started", "progress", "output", "completed"]


class LoraEntry(TypedDict):
    """A LoRA of a generation: a registry name, ``storage:<key>`` or ``job:<id>``."""

    name: str
    scale: float


class ControlEntry(TypedDict):
    """A ControlNet of a generation and its control image (a ``sha256:`` stash once
    taken in, or a URL)."""

    name: str
    image: str
    scale: float
    start: float
    end: float
    preprocess: Literal["none", "canny"]


class ReferenceEntry(TypedDict):
    """An IP-Adapter reference image of a generation."""

    image: str
    scale: float
    mode: Literal["full", "subject", "style"]


class SweepAxes(TypedDict, total=False):
    """A sweep's axes: only those given are present (one or two)."""

    seeds: list[int]
    guidance_scale: list[float]
    steps: list[int]


class GenerateRequest(TypedDict):
    """A generation as it runs: the model's defaults filled in, a seed drawn.

    The ``NotRequired`` keys are present only when the request uses the feature, so a
    record that uses none reads exactly as before the feature existed.
    """

    prompt: str
    negative_prompt: str
    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    num_images: int
    #: A URL, a ``data:`` URI before intake, ``sha256:<hex>`` after.
    image: str | None
    #: Set (the default filled in) exactly when ``image`` is.
    strength: float | None
    output_format: OutputFormat
    quality: int
    webhook: str | None
    webhook_events: list[WebhookEventName]
    metadata: dict[str, Any]
    priority: int
    timeout_s: int
    expires_in_s: int | None
    mask: NotRequired[str]
    loras: NotRequired[list[LoraEntry]]
    sweep: NotRequired[SweepAxes]
    preview: NotRequired[bool]
    control: NotRequired[list[ControlEntry]]
    references: NotRequired[list[ReferenceEntry]]


class TrainingRequest(TypedDict):
    """A training (DreamBooth LoRA) as it runs: resolution, seed, validation prompt and
    timeout filled in; the prior-preservation and text-encoder knobs only when used."""

    model: str
    #: Each a URL, ``storage:<key>``, a ``data:`` URI before intake, ``sha256:<hex>``
    #: (``sha256:<hex>.zip`` for a zip) after.
    images: list[str]
    instance_prompt: str
    captions: list[str] | None
    class_prompt: str | None
    prior_preservation: bool
    num_class_images: NotRequired[int]
    prior_loss_weight: NotRequired[float]
    steps: int
    learning_rate: float
    train_text_encoder: bool
    text_encoder_lr: NotRequired[float]
    rank: int
    resolution: int
    batch_size: int
    gradient_accumulation: int
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"]
    lr_warmup_steps: int
    checkpoint_every: int
    seed: int
    validation_prompt: str
    num_validation_images: int
    webhook: str | None
    webhook_events: list[WebhookEventName]
    metadata: dict[str, Any]
    priority: int
    timeout_s: int
    expires_in_s: int | None


#: A job's normalised request, of either kind (the record's ``kind`` says which).
NormalizedRequest: TypeAlias = GenerateRequest | TrainingRequest

if TYPE_CHECKING:
    #: A record's ``request`` (:class:`producer.core.contract.Record`), for the type checker.
    RecordRequest: TypeAlias = NormalizedRequest
else:
    # For pydantic (the API's schema and its response checks) a JSON object: a record
    # written before a key existed still reads, and the document stays as it was.
    RecordRequest = dict[str, Any]
