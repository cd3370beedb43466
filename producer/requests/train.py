"""Checking a training request (docs/trainings.md "The request") and normalizing it.

:func:`validate_training` is the one entry, used by the client and the API alike, in
the manner of :func:`producer.requests.generate.validate_request`: the shape, the model (its
family must train), the images (inline ones decoded, an inline zip read under its caps,
URLs checked, storage keys checked), the prompts against the images, then delivery;
every bad field named, nothing enqueued. Images given by URL or storage key are read by
the worker, which refuses them the same way (``image_invalid``).
"""

from __future__ import annotations

import secrets
from typing import Any, cast

from producer.core.contract import MAX_SEED
from producer.core.errors import InvalidRequest, UnknownModel
from producer.core.images import decode_data_uri, open_image
from producer.core.normalized import TrainingRequest
from producer.core.registry import ModelSpec, Registry
from producer.core.settings import Settings
from producer.core.train_contract import (
    MAX_TRAIN_IMAGES,
    TRAINABLE_PIPELINES,
    TrainRequest,
    decode_zip_uri,
    is_zip_source,
    read_zip,
)
from producer.requests.fields import FieldError, Fields, parse, refused_url, resolve_model

__all__ = ["check_storage_key", "decode_zip_uri", "validate_training"]


def validate_training(data: Any, registry: Registry, settings: Settings) -> TrainingRequest:
    """Check ``data`` as a training request and return it normalized.

    Raises :class:`InvalidRequest` (or :class:`UnknownModel`) naming every bad field.
    """
    if not isinstance(data, dict):
        raise InvalidRequest([{"field": "body", "message": "must be a JSON object"}])
    req, errors = parse(TrainRequest, data)
    fields = Fields(data, errors, req)
    spec, unknown = resolve_model(fields, registry, settings)
    errors += unknown
    if spec is not None:
        errors += _check_model(fields, spec)
    count, image_errors = _check_images(fields, settings)
    errors += image_errors
    errors += _check_prompts(fields, count)
    errors += _check_delivery(fields, settings)
    if errors:
        raise (UnknownModel if unknown else InvalidRequest)(errors)
    assert req is not None and spec is not None
    return _normalize(req, spec, settings)


def _check_model(fields: Fields, spec: ModelSpec) -> list[FieldError]:
    errors: list[FieldError] = []
    if spec.pipeline not in TRAINABLE_PIPELINES:
        errors.append(
            {
                "field": "model",
                "message": f"{spec.name} is a {spec.pipeline} model; "
                f"trainings run on {', '.join(TRAINABLE_PIPELINES)} models",
            }
        )
    res = fields.valid("resolution")
    if res is not None and res > spec.max_side:
        errors.append(
            {"field": "resolution", "message": f"must be ≤ {spec.max_side} for {spec.name}"}
        )
    return errors


def check_storage_key(key: str) -> str | None:
    """Why ``storage:<key>`` may not name a training image or zip, or None."""
    if (
        not key
        or key.startswith("/")
        or ".." in key.split("/")
        or "\\" in key
        or not key.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".zip"))
    ):
        return (
            "storage:<key> must name a .png, .jpg, .webp or .zip object by a relative key (no '..')"
        )
    return None


def _check_images(fields: Fields, settings: Settings) -> tuple[int | None, list[FieldError]]:
    """Each ``images`` entry; how many images they make (None when a zip is not read
    here: one given by URL or storage key)."""
    images = fields.valid("images")
    if images is None:
        return None, []
    errors: list[FieldError] = []
    zips = [i for i, src in enumerate(images) if is_zip_source(src)]
    if zips and len(images) > 1:
        errors.append(
            {"field": f"images.{zips[0]}", "message": "a .zip must be the only entry of images"}
        )
    count: int | None = len(images)
    for i, src in enumerate(images):
        field = f"images.{i}"
        try:
            if src.startswith("data:"):
                if is_zip_source(src):
                    raw = decode_zip_uri(src, settings.train_zip_max_bytes)
                    entries = read_zip(
                        raw,
                        settings.train_zip_max_entries,
                        settings.max_image_bytes,
                        settings.train_zip_max_bytes,
                    )
                    for name, data in entries:
                        _open_entry(name, data)
                    count = len(entries)
                else:
                    open_image(decode_data_uri(src, settings.max_image_bytes))
            elif src.startswith("storage:"):
                if why := check_storage_key(src.removeprefix("storage:")):
                    errors.append({"field": field, "message": why})
                if is_zip_source(src):
                    count = None
            elif why := refused_url(src, settings):
                errors.append({"field": field, "message": why + ", a data: URI or storage:<key>"})
            elif is_zip_source(src):
                count = None
        except ValueError as exc:
            errors.append({"field": field, "message": str(exc)})
    return count, errors


def _open_entry(name: str, data: bytes) -> None:
    try:
        open_image(data)
    except ValueError as exc:
        raise ValueError(f"entry {name!r} {exc}") from None


def _check_prompts(fields: Fields, count: int | None) -> list[FieldError]:
    errors: list[FieldError] = []
    captions = fields.valid("captions")
    if captions is not None and count is not None and len(captions) != count:
        errors.append(
            {
                "field": "captions",
                "message": f"gives {len(captions)} captions for {count} images: one per image",
            }
        )
    if fields.valid("prior_preservation") and not fields.given("class_prompt"):
        errors.append(
            {
                "field": "class_prompt",
                "message": 'is required with prior_preservation (e.g. "a photo of a dog")',
            }
        )
    steps, warmup = fields.valid("steps"), fields.valid("lr_warmup_steps")
    if isinstance(steps, int) and isinstance(warmup, int) and warmup > steps:
        errors.append({"field": "lr_warmup_steps", "message": f"must be ≤ steps ({steps})"})
    return errors


def _check_delivery(fields: Fields, settings: Settings) -> list[FieldError]:
    errors: list[FieldError] = []
    hook = fields.valid("webhook")
    if hook is not None and (why := refused_url(hook, settings)):
        errors.append({"field": "webhook", "message": why})
    t = fields.valid("timeout_s")
    if t is not None and t > settings.train_timeout_s:
        errors.append({"field": "timeout_s", "message": f"must be ≤ {settings.train_timeout_s}"})
    return errors


def _normalize(req: TrainRequest, spec: ModelSpec, settings: Settings) -> TrainingRequest:
    out = req.model_dump()
    out["model"] = spec.name
    out["resolution"] = req.resolution or min(spec.width, spec.height)
    out["seed"] = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED - 8)
    out["validation_prompt"] = req.validation_prompt or req.instance_prompt
    out["timeout_s"] = req.timeout_s or settings.train_timeout_s
    if not req.train_text_encoder:
        out.pop("text_encoder_lr")
    if not req.prior_preservation:
        for key in ("num_class_images", "prior_loss_weight"):
            out.pop(key)
    assert len(out["images"]) <= MAX_TRAIN_IMAGES
    # Every key above is one of TrainingRequest's, with its type (tests/test_normalized.py).
    return cast(TrainingRequest, out)
