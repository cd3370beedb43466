"""The request of a training (docs/trainings.md "The request"), and its zip of
images read in memory under caps.

:class:`TrainRequest` is the shape; :func:`producer.requests.train.validate_training`
checks it against the model and normalizes it. :func:`read_zip` is shared by the
producer (an inline zip is checked at submit) and the worker (every zip is read there):
entries are never extracted to paths, only read, each bounded, into memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import zipfile
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from producer.core.constraints import DISTINCT, NOT_BLANK, integral
from producer.core.contract import (
    MAX_EXPIRES_IN_S,
    MAX_SEED,
    distinct_events,
    small_metadata,
)
from producer.core.families import TRAINABLE_PIPELINES

__all__ = ["TRAINABLE_PIPELINES", "TrainRequest", "decode_zip_uri", "is_zip_source", "read_zip"]

#: Instance images a training takes (a zip's entries count).
MAX_TRAIN_IMAGES = 64
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: The schema of "prior_preservation needs a class_prompt", which the check says too.
_CLASS_PROMPT_NEEDED: dict[str, Any] = {
    "if": {
        "properties": {"prior_preservation": {"const": True}},
        "required": ["prior_preservation"],
    },
    "then": {"properties": {"class_prompt": {"type": "string"}}, "required": ["class_prompt"]},
}


class TrainRequest(BaseModel):
    """What ``POST /v1/trainings`` takes. ``None``: the model or the worker decides."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"allOf": [_CLASS_PROMPT_NEEDED]}
    )

    model: str | None = None
    images: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=MAX_TRAIN_IMAGES
    )
    instance_prompt: str = Field(min_length=1, max_length=1000, json_schema_extra=NOT_BLANK)
    #: One per image: an empty list gives none, so it is refused as too short.
    captions: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TRAIN_IMAGES)
    class_prompt: str | None = Field(
        default=None, min_length=1, max_length=1000, json_schema_extra=NOT_BLANK
    )
    prior_preservation: bool = False
    num_class_images: int = Field(default=50, ge=1, le=500)
    prior_loss_weight: float = Field(default=1.0, ge=0, le=10, allow_inf_nan=False)
    steps: int = Field(default=500, ge=1, le=20000)
    learning_rate: float = Field(default=1e-4, gt=0, le=1e-2, allow_inf_nan=False)
    train_text_encoder: bool = False
    text_encoder_lr: float = Field(default=5e-6, gt=0, le=1e-2, allow_inf_nan=False)
    rank: int = Field(default=4, ge=1, le=128)
    resolution: int | None = Field(default=None, ge=64, multiple_of=8)
    batch_size: int = Field(default=1, ge=1, le=8)
    gradient_accumulation: int = Field(default=1, ge=1, le=64)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=100, ge=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    validation_prompt: str | None = Field(
        default=None, min_length=1, max_length=1000, json_schema_extra=NOT_BLANK
    )
    num_validation_images: int = Field(default=2, ge=0, le=8)
    webhook: str | None = None
    webhook_events: list[Literal["started", "progress", "output", "completed"]] = Field(
        default_factory=lambda: ["completed"],  # type: ignore[arg-type]
        json_schema_extra=DISTINCT,
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=5, ge=0, le=9)
    timeout_s: int | None = Field(default=None, ge=1)
    expires_in_s: int | None = Field(default=None, ge=1, le=MAX_EXPIRES_IN_S)

    @field_validator(
        *("num_class_images", "steps", "rank", "resolution", "batch_size"),
        *("gradient_accumulation", "lr_warmup_steps", "checkpoint_every", "seed"),
        *("num_validation_images", "priority", "timeout_s", "expires_in_s"),
        mode="before",
    )
    @classmethod
    def _whole(cls, v: Any) -> Any:
        return integral(v)

    @field_validator("instance_prompt", "class_prompt", "validation_prompt")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("webhook_events")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return distinct_events(v)  # the same checks as a job's

    @field_validator("metadata")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        return small_metadata(v)


def is_zip_source(src: str) -> bool:
    """Whether an ``images`` entry names a zip of images rather than one image."""
    if src.startswith("data:"):
        return src[5:].lower().startswith(("application/zip", "application/x-zip"))
    return src.split("?", 1)[0].lower().endswith(".zip")


def decode_zip_uri(value: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:application/zip;base64,`` URI; ValueError says what is wrong."""
    head, sep, payload = value.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ValueError("must be a data:application/zip;base64,... URI")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ValueError(f"is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None


def read_zip(
    raw: bytes, max_entries: int, max_entry_bytes: int, max_total_bytes: int
) -> list[tuple[str, bytes]]:
    """The image entries of a zip, in name order, read in memory: ValueError names what
    is wrong (too many entries, one too large, too much in all, a name that climbs out or
    is absolute, an entry that is not a PNG/JPEG/WebP file, no image at all).

    Sizes are checked against the headers first, then while reading (a header can lie).
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, ValueError):
        raise ValueError("is not a readable zip file") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > max_entries:
            raise ValueError(f"holds {len(infos)} entries; at most {max_entries}")
        declared = sum(i.file_size for i in infos)
        if declared > max_total_bytes:
            raise ValueError(f"holds {declared} bytes uncompressed; at most {max_total_bytes}")
        out: list[tuple[str, bytes]] = []
        total = 0
        for info in sorted(infos, key=lambda i: i.filename):
            name = info.filename
            parts = name.replace("\\", "/").split("/")
            if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise ValueError(f"entry {name!r}: a path that leaves the archive")
            if parts[-1].startswith(".") or parts[0] == "__MACOSX":
                continue  # Finder's and editors' droppings
            if not name.lower().endswith(IMAGE_SUFFIXES):
                raise ValueError(f"entry {name!r} is not a .png, .jpg or .webp image")
            if info.file_size > max_entry_bytes:
                raise ValueError(f"entry {name!r} is larger than {max_entry_bytes} bytes")
            try:
                with zf.open(info) as fh:
                    data = fh.read(max_entry_bytes + 1)
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as exc:
                raise ValueError(f"entry {name!r} cannot be read ({exc})") from None
            total += len(data)
            if len(data) > max_entry_bytes or total > max_total_bytes:
                raise ValueError(f"entry {name!r} inflates past the size limits")
            out.append((name, data))
    if not out:
        raise ValueError("holds no image")
    if len(out) > MAX_TRAIN_IMAGES:
        raise ValueError(f"holds {len(out)} images; at most {MAX_TRAIN_IMAGES}")
    return out
