"""Checking a job request against the contract, and normalizing it.

:func:`validate_request` is the one entry, used by the Python client and the HTTP API
alike. It runs, in order:

1. the shape: a JSON object whose fields pass their own checks (:class:`JobRequest`);
2. the model and its limits: size, pixels, what its family can do, schedulers;
3. the input images: inline ones decoded, URLs checked, ``mask`` and ``strength``
   against ``image``;
4. LoRAs, sweeps, ControlNets and reference images;
5. delivery: the seed range, the webhook URL, ``timeout_s``;
6. normalization: the model's defaults filled in and a seed drawn, so the record says
   exactly what ran.

Every check names the field it refuses; all of them run, so one answer lists every bad
field. A check never sees a value that failed its own field check (:class:`Fields`).
"""

from __future__ import annotations

import re
import secrets
from typing import Any, cast

from producer.core.contract import (
    DEFAULT_STRENGTH,
    MAX_SEED,
    MAX_SWEEP_IMAGES,
    SWEEP_AXES,
    JobRequest,
)
from producer.core.errors import InvalidRequest, UnknownModel
from producer.core.families import WEIGHTING_PIPELINES
from producer.core.normalized import GenerateRequest
from producer.core.registry import ModelSpec, Registry
from producer.core.settings import Settings
from producer.requests.conditioning import check_conditioning, check_loras
from producer.requests.fields import (
    FieldError,
    Fields,
    check_source,
    parse,
    refused_url,
    resolve_model,
)

__all__ = ["validate_request"]

#: ``(text:1.3)``: the weighting syntax only CLIP-prompted families read (worker/diffusion/prompts).
_WEIGHTED = re.compile(r"\([^()]*:\s*[+-]?[\d.]+\s*\)")


def validate_request(data: Any, registry: Registry, settings: Settings) -> GenerateRequest:
    """Check ``data`` against the contract and return the normalized request.

    Raises :class:`InvalidRequest` (or :class:`UnknownModel`) naming every bad field.
    """
    # 1. The shape.
    if not isinstance(data, dict):
        raise InvalidRequest([{"field": "body", "message": "must be a JSON object"}])
    req, errors = parse(JobRequest, data)
    fields = Fields(data, errors, req)
    # 2. The model and its limits.
    spec, unknown = resolve_model(fields, registry, settings)
    errors += unknown
    if spec is not None:
        errors += _check_model_limits(fields, spec)
    # 3. Input images.
    errors += _check_images(fields, spec, settings)
    # 4. LoRAs and sweeps.
    errors += check_loras(fields.valid("loras") or [], registry, spec)
    errors += _check_sweep(fields, spec)
    errors += check_conditioning(fields, registry, spec, settings)
    # 5. Delivery.
    errors += _check_delivery(fields, settings)
    if errors:
        raise (UnknownModel if unknown else InvalidRequest)(errors)
    # 6. Normalization.
    assert req is not None and spec is not None
    return _normalize(req, spec, settings)


def _check_model_limits(fields: Fields, spec: ModelSpec) -> list[FieldError]:
    errors = []
    for side in ("width", "height"):
        v = fields.valid(side)
        if v is not None and v > spec.max_side:
            errors.append({"field": side, "message": f"must be ≤ {spec.max_side} for {spec.name}"})
    w = fields.valid("width") or spec.width
    h = fields.valid("height") or spec.height
    if w * h > spec.max_pixels and not {"width", "height"} & fields.failed:
        errors.append(
            {
                "field": "width",
                "message": f"width × height = {w * h} exceeds "
                f"{spec.max_pixels} pixels for {spec.name}",
            }
        )
    errors += _check_family(fields, spec)
    sched = fields.valid("scheduler")
    if sched is not None and sched not in spec.schedulers:
        errors.append(
            {
                "field": "scheduler",
                "message": f"{sched!r} is not allowed for "
                f"{spec.name}; allowed: {', '.join(spec.schedulers)}",
            }
        )
    return errors


def _check_family(fields: Fields, spec: ModelSpec) -> list[FieldError]:
    """What a model family cannot do, refused by field rather than silently ignored."""
    errors = []
    for side in ("width", "height"):
        v = fields.valid(side)
        if v is not None and v % spec.size_multiple:
            errors.append(
                {
                    "field": side,
                    "message": f"must be a multiple of {spec.size_multiple} for {spec.name}",
                }
            )
    guidance = fields.valid("guidance_scale")
    negative = fields.valid("negative_prompt")
    if not spec.cfg:
        if negative:
            errors.append(
                {
                    "field": "negative_prompt",
                    "message": f"{spec.name} is guidance-"
                    "distilled and runs without classifier-free guidance: leave it out",
                }
            )
        if guidance is not None and guidance != 0:
            errors.append(
                {
                    "field": "guidance_scale",
                    "message": f"must be 0 for {spec.name} (guidance-distilled)",
                }
            )
    elif negative and not (fields.given("guidance_scale") and guidance is None):
        # (a guidance_scale that failed its own check is named already)
        effective = guidance if guidance is not None else spec.guidance_scale
        swept = (fields.valid("sweep") or {}).get("guidance_scale")
        if swept:
            effective = max(swept)
        if effective <= 1:
            errors.append(
                {
                    "field": "negative_prompt",
                    "message": f"has no effect at "
                    f"guidance_scale {effective:g} (classifier-free guidance needs "
                    "> 1): raise guidance_scale or leave it out",
                }
            )
    if spec.pipeline not in WEIGHTING_PIPELINES:
        for name in ("prompt", "negative_prompt"):
            text = fields.valid(name)
            if isinstance(text, str) and _WEIGHTED.search(text):
                errors.append(
                    {
                        "field": name,
                        "message": f"weighting syntax (text:1.3) is not "
                        f"read by {spec.pipeline} models such as {spec.name}",
                    }
                )
    return errors


def _check_images(fields: Fields, spec: ModelSpec | None, settings: Settings) -> list[FieldError]:
    """``image`` and ``mask``: inline ones decoded once, URLs checked; their companions."""
    errors: list[FieldError] = []
    sizes: dict[str, tuple[int, int]] = {}
    for name in ("image", "mask"):
        src = fields.valid(name)
        if src is None:
            continue
        size = check_source(name, src, settings, errors)
        if size is not None:
            sizes[name] = size
    if fields.valid("mask") is not None and not fields.given("image"):
        errors.append(
            {
                "field": "mask",
                "message": "is only allowed with image (inpainting "
                "repaints the masked part of image)",
            }
        )
    if len(sizes) == 2 and sizes["image"] != sizes["mask"]:
        # Both inline: checked here. A URL is only fetched by the worker, which checks
        # the same and fails the job with image_invalid.
        (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
        errors.append(
            {
                "field": "mask",
                "message": f"is {mw}×{mh} but image is {iw}×{ih}; they must be the same size",
            }
        )
    if fields.valid("strength") is not None and not fields.given("image"):
        errors.append({"field": "strength", "message": "is only allowed with image"})
    if fields.given("image") and spec is not None and "strength" not in fields.failed:
        # img2img runs int(steps × strength) denoising steps: zero of them is no image.
        steps = fields.valid("steps") or spec.steps
        strength = _strength(fields)
        if int(steps * strength) < 1:
            errors.append(
                {
                    "field": "strength",
                    "message": f"strength {strength} × steps "
                    f"{steps} leaves no denoising step; raise either",
                }
            )
    return errors


def _strength(fields: Fields) -> Any:
    strength = fields.valid("strength")
    return strength if strength is not None else DEFAULT_STRENGTH


def _check_sweep(fields: Fields, spec: ModelSpec | None) -> list[FieldError]:
    sweep = fields.valid("sweep")
    if sweep is None:
        return []
    errors = []
    axes = [a for a in SWEEP_AXES if sweep.get(a)]
    if not 1 <= len(axes) <= 2:
        errors.append(
            {
                "field": "sweep",
                "message": f"give one or two axes of {', '.join(SWEEP_AXES)} (got {len(axes)})",
            }
        )
    else:
        total = 1
        for a in axes:
            total *= len(sweep[a])
        if total > MAX_SWEEP_IMAGES:
            errors.append(
                {"field": "sweep", "message": f"makes {total} images; at most {MAX_SWEEP_IMAGES}"}
            )
    if fields.data.get("num_images", 1) != 1:
        errors.append(
            {
                "field": "num_images",
                "message": "must be 1 with sweep (each cell of the grid is one image)",
            }
        )
    for axis, field in (
        ("seeds", "seed"),
        ("steps", "steps"),
        ("guidance_scale", "guidance_scale"),
    ):
        if sweep.get(axis) and fields.given(field):
            errors.append({"field": field, "message": f"leave it out with sweep.{axis}"})
    if spec is not None and sweep.get("guidance_scale") and not spec.cfg:
        errors.append(
            {
                "field": "sweep.guidance_scale",
                "message": f"{spec.name} runs without guidance: nothing to sweep",
            }
        )
    if fields.given("image") and sweep.get("steps"):
        low, strength = min(sweep["steps"]), _strength(fields)
        if int(low * strength) < 1:
            errors.append(
                {
                    "field": "sweep.steps",
                    "message": f"{low} steps × strength {strength} leaves no denoising step",
                }
            )
    return errors


def _check_delivery(fields: Fields, settings: Settings) -> list[FieldError]:
    """The seed range of the whole job, the webhook URL, and ``timeout_s``."""
    errors = []
    seed, n = fields.valid("seed"), fields.valid("num_images")
    if seed is not None and isinstance(n, int) and seed + n - 1 > MAX_SEED:
        errors.append(
            {
                "field": "seed",
                "message": f"seed + num_images - 1 must be ≤ {MAX_SEED} (image i uses seed + i)",
            }
        )
    hook = fields.valid("webhook")
    if hook is not None and (why := refused_url(hook, settings)):
        errors.append({"field": "webhook", "message": why})
    t = fields.valid("timeout_s")
    if t is not None and t > settings.job_timeout_s:
        errors.append({"field": "timeout_s", "message": f"must be ≤ {settings.job_timeout_s}"})
    return errors


def _normalize(req: JobRequest, spec: ModelSpec, settings: Settings) -> GenerateRequest:
    """The request as it runs: the model's defaults filled in and a seed drawn."""
    out = req.model_dump()
    out["model"] = spec.name
    out["width"] = req.width or spec.width
    out["height"] = req.height or spec.height
    out["steps"] = req.steps or spec.steps
    out["guidance_scale"] = (
        float(req.guidance_scale) if req.guidance_scale is not None else spec.guidance_scale
    )
    out["scheduler"] = req.scheduler or spec.scheduler
    # Drawn below the top so seed + i stays within 32 bits for every image.
    out["seed"] = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED - 8)
    out["strength"] = (
        (req.strength if req.strength is not None else DEFAULT_STRENGTH) if req.image else None
    )
    out["timeout_s"] = req.timeout_s or settings.job_timeout_s
    # Features a request does not use leave no key: its record (and the request in its
    # PNGs) reads exactly as before they existed.
    for key in ("mask", "loras", "sweep", "preview", "control", "references"):
        if not out.get(key):
            out.pop(key, None)
    if req.sweep is not None:
        out["sweep"] = req.sweep.model_dump(exclude_none=True)
        if req.sweep.seeds:
            out["seed"] = req.sweep.seeds[0]
    # Every key above is one of GenerateRequest's, with its type (tests/test_normalized.py).
    return cast(GenerateRequest, out)
