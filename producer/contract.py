"""The job contract both sides share: request, record, states, events.

Light on purpose: pydantic only. The worker imports it; it never imports the worker.
"""

from __future__ import annotations

import base64
import binascii
import enum
import io
import ipaddress
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from producer.errors import InvalidRequest, UnknownModel
from producer.netguard import is_public, parse_allowlist
from producer.registry import WEIGHTING_PIPELINES, Registry
from producer.settings import Settings

MAX_SEED = 2**32 - 1
METADATA_MAX_BYTES = 4096
DEFAULT_STRENGTH = 0.6
MAX_EXPIRES_IN_S = 30 * 24 * 3600
WEBHOOK_EVENT_NAMES = ("started", "progress", "output", "completed")
#: Decoders Pillow may use for init images; everything else is refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


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


def terminal_event(doc: dict[str, Any]) -> tuple[EventType, dict[str, Any]]:
    """The event that announces a finished record: the record itself, and the error."""
    data: dict[str, Any] = {"job": doc}
    if doc.get("error"):
        data["error"] = doc["error"]
    return TERMINAL_EVENT_FOR[Status(doc["status"])], data


MAX_LORAS = 4


class LoraRef(BaseModel):
    """One LoRA adapter of a request: a registry name or ``storage:<key>``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=1024)
    scale: float = Field(default=1.0, ge=-4, le=4, allow_inf_nan=False)


MAX_SWEEP_IMAGES = 16
#: Sweep axes in grid order: the first one given runs along the columns, the second
#: along the rows.
SWEEP_AXES = ("seeds", "guidance_scale", "steps")


class Sweep(BaseModel):
    """A grid of generations in one job: one or two axes, every combination one image."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(
        default=None, min_length=1, max_length=MAX_SWEEP_IMAGES)
    guidance_scale: list[Annotated[float, Field(ge=0, le=30, allow_inf_nan=False)]] | None = (
        Field(default=None, min_length=1, max_length=MAX_SWEEP_IMAGES))
    steps: list[Annotated[int, Field(ge=1, le=150)]] | None = Field(
        default=None, min_length=1, max_length=MAX_SWEEP_IMAGES)

    @field_validator("seeds", "guidance_scale", "steps")
    @classmethod
    def _distinct(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("must not repeat a value")
        return v


def sweep_cells(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid of a normalized request, row by row: each cell's seed, steps, guidance
    and the axis values that label it. Empty for a request without a sweep."""
    sweep = request.get("sweep")
    if not sweep:
        return []
    axes = [a for a in SWEEP_AXES if sweep.get(a)]
    cols = sweep[axes[0]]
    rows: list[Any] = sweep[axes[1]] if len(axes) > 1 else [None]
    cells = []
    for y in rows:
        for x in cols:
            label = {axes[0]: x} if y is None else {axes[0]: x, axes[1]: y}
            cells.append({
                "seed": label.get("seeds", request["seed"]),
                "steps": label.get("steps", request["steps"]),
                "guidance_scale": float(label.get("guidance_scale", request["guidance_scale"])),
                "label": label,
            })
    return cells


def denoise_steps(request: dict[str, Any]) -> int:
    """Denoising steps the whole job runs (img2img runs int(steps × strength) of them)."""
    def one(steps: int) -> int:
        return int(steps * request["strength"]) if request.get("image") else steps

    cells = sweep_cells(request)
    if cells:
        return sum(one(c["steps"]) for c in cells)
    return one(request["steps"])


class JobRequest(BaseModel):
    """What a producer submits. Fields the model decides are ``None`` until normalized."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = Field(default="", max_length=4000)
    model: str | None = None
    width: int | None = Field(default=None, ge=64, multiple_of=8)
    height: int | None = Field(default=None, ge=64, multiple_of=8)
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=0, le=30, allow_inf_nan=False)
    scheduler: str | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_images: int = Field(default=1, ge=1, le=8)
    image: str | None = None
    strength: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    output_format: Literal["png", "webp", "jpeg"] = "png"
    quality: int = Field(default=90, ge=1, le=100)
    webhook: str | None = None
    webhook_events: list[Literal["started", "progress", "output", "completed"]] = Field(
        default_factory=lambda: ["completed"]  # type: ignore[arg-type,return-value]
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

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("webhook_events")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("must not repeat an event")
        return v

    @field_validator("metadata")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(v, separators=(",", ":"), allow_nan=False).encode())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be plain JSON ({exc})") from None
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"is {size} bytes as JSON; the limit is {METADATA_MAX_BYTES}")
        return v


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _check_url(value: str, allow_http: bool) -> str | None:
    """Why ``value`` is not an acceptable outbound URL, or None."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return "is not a URL"
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        return "must be an https URL" + (" (or http)" if allow_http else "")
    if not parts.hostname:
        return "has no host"
    if parts.username or parts.password:
        return "must not carry credentials"
    if len(value) > 2048:
        return "is longer than 2048 characters"
    return None


def _literal_refused(value: str, allowlist: str) -> str | None:
    """Why a URL whose host is an IP literal may never be called, or None.

    Host names are checked when called (DNS can change); a literal address can be
    refused at once.
    """
    host = urlsplit(value).hostname or ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    hosts, nets = parse_allowlist(allowlist)
    if host in hosts or any(addr in net for net in nets) or is_public(addr):
        return None
    return f"points at {addr}, which is not a public address"


def decode_data_uri(value: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:image/...;base64,`` URI; ValueError says what is wrong."""
    head, sep, payload = value.partition(",")
    if (not sep or not head.startswith("data:") or not head[5:].lower().startswith("image/")
            or not head.endswith(";base64")):
        raise ValueError("must be a data:image/...;base64,... URI")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise ValueError(f"is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if len(raw) > max_bytes:
        raise ValueError(f"is larger than {max_bytes} bytes")
    return raw


def open_image(raw: bytes, max_pixels: int = 4096 * 4096) -> Any:
    """Decode an init image with Pillow, restricted to PNG/JPEG/WEBP and bounded in size."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        if img.width * img.height > max_pixels:
            raise ValueError(f"is {img.width}×{img.height}; at most {max_pixels} pixels")
        img.load()
    except Image.DecompressionBombError:
        raise ValueError("is too large to decode") from None
    except (OSError, SyntaxError):  # Pillow's UnidentifiedImageError is an OSError
        raise ValueError("is not a readable PNG, JPEG or WEBP image") from None
    return img.convert("RGB")


#: ``(text:1.3)``: the weighting syntax only CLIP-prompted families read (worker/prompts.py).
_WEIGHTED = re.compile(r"\([^()]*:\s*[+-]?[\d.]+\s*\)")


def _check_family(data: dict[str, Any], ok: Any, spec: Any) -> list[dict[str, str]]:
    """What a model family cannot do, refused by field rather than silently ignored."""
    errors = []
    for side in ("width", "height"):
        v = ok(side)
        if v is not None and v % spec.size_multiple:
            errors.append({"field": side, "message": f"must be a multiple of "
                           f"{spec.size_multiple} for {spec.name}"})
    guidance = ok("guidance_scale")
    negative = ok("negative_prompt")
    if not spec.cfg:
        if negative:
            errors.append({"field": "negative_prompt", "message": f"{spec.name} is guidance-"
                           "distilled and runs without classifier-free guidance: leave it out"})
        if guidance is not None and guidance != 0:
            errors.append({"field": "guidance_scale", "message": f"must be 0 for {spec.name} "
                           "(guidance-distilled)"})
    elif negative and not (data.get("guidance_scale") is not None and guidance is None):
        # (a guidance_scale that failed its own check is named already)
        effective = guidance if guidance is not None else spec.guidance_scale
        swept = (ok("sweep") or {}).get("guidance_scale")
        if swept:
            effective = max(swept)
        if effective <= 1:
            errors.append({"field": "negative_prompt", "message": f"has no effect at "
                           f"guidance_scale {effective:g} (classifier-free guidance needs "
                           "> 1): raise guidance_scale or leave it out"})
    if spec.pipeline not in WEIGHTING_PIPELINES:
        for name in ("prompt", "negative_prompt"):
            text = ok(name)
            if isinstance(text, str) and _WEIGHTED.search(text):
                errors.append({"field": name, "message": f"weighting syntax (text:1.3) is not "
                               f"read by {spec.pipeline} models such as {spec.name}"})
    return errors


def _check_sweep(data: dict[str, Any], ok: Any, spec: Any) -> list[dict[str, str]]:
    sweep = ok("sweep")
    if sweep is None:
        return []
    errors = []
    axes = [a for a in SWEEP_AXES if sweep.get(a)]
    if not 1 <= len(axes) <= 2:
        errors.append({"field": "sweep", "message": "give one or two axes of "
                       f"{', '.join(SWEEP_AXES)} (got {len(axes)})"})
    else:
        total = 1
        for a in axes:
            total *= len(sweep[a])
        if total > MAX_SWEEP_IMAGES:
            errors.append({"field": "sweep", "message": f"makes {total} images; at most "
                           f"{MAX_SWEEP_IMAGES}"})
    if data.get("num_images", 1) != 1:
        errors.append({"field": "num_images", "message": "must be 1 with sweep (each cell of "
                       "the grid is one image)"})
    if sweep.get("seeds") and data.get("seed") is not None:
        errors.append({"field": "seed", "message": "leave it out with sweep.seeds"})
    if sweep.get("steps") and data.get("steps") is not None:
        errors.append({"field": "steps", "message": "leave it out with sweep.steps"})
    if sweep.get("guidance_scale") and data.get("guidance_scale") is not None:
        errors.append({"field": "guidance_scale",
                       "message": "leave it out with sweep.guidance_scale"})
    if spec is not None and sweep.get("guidance_scale") and not spec.cfg:
        errors.append({"field": "sweep.guidance_scale", "message": f"{spec.name} runs "
                       "without guidance: nothing to sweep"})
    strength = ok("strength") if ok("strength") is not None else DEFAULT_STRENGTH
    if data.get("image") is not None and sweep.get("steps"):
        low = min(sweep["steps"])
        if int(low * strength) < 1:
            errors.append({"field": "sweep.steps", "message": f"{low} steps × strength "
                           f"{strength} leaves no denoising step"})
    return errors


def _check_loras(loras: list[dict[str, Any]], registry: Registry,
                 spec: Any) -> list[dict[str, str]]:
    """Each LoRA must exist (registry) or name a plausible storage key, and fit the model."""
    errors = []
    seen: set[str] = set()
    for i, ref in enumerate(loras):
        name, field = ref["name"], f"loras.{i}.name"
        if name in seen:
            errors.append({"field": field, "message": f"{name!r} is repeated"})
        seen.add(name)
        if name.startswith("storage:"):
            key = name.removeprefix("storage:")
            if (not key.endswith(".safetensors") or key.startswith("/")
                    or ".." in key.split("/") or "\\" in key):
                errors.append({"field": field, "message": "storage:<key> must name a "
                               ".safetensors object by a relative key (no '..')"})
            continue
        lora = registry.lora(name)
        if lora is None:
            known = ", ".join(registry.lora_names()) or "none"
            errors.append({"field": field, "message": f"unknown LoRA {name!r}; known: {known}; "
                           "or storage:<key> for an uploaded .safetensors file"})
        elif spec is not None and lora.family != spec.pipeline:
            errors.append({"field": field, "message": f"{name!r} is for {lora.family} models; "
                           f"{spec.name} is {spec.pipeline}"})
    return errors


def validate_request(data: Any, registry: Registry, settings: Settings) -> dict[str, Any]:
    """Check ``data`` against the contract and return the normalized request.

    Normalized: the model's defaults filled in and a seed drawn, so the record says
    exactly what ran. Raises :class:`InvalidRequest` naming every bad field.
    """
    if not isinstance(data, dict):
        raise InvalidRequest([{"field": "body", "message": "must be a JSON object"}])
    errors: list[dict[str, str]] = []
    try:
        req: JobRequest | None = JobRequest.model_validate(data)
    except ValidationError as exc:
        req = None
        for e in exc.errors():
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown field"
            errors.append({"field": _loc(e["loc"]), "message": msg})
    bad = {e["field"].split(".")[0] for e in errors}

    def ok(name: str) -> Any:
        """The raw value of a field that passed its own checks, else None."""
        return None if name in bad else data.get(name)

    # Checks that depend on the model, the settings, or several fields at once.
    model_name = ok("model") if data.get("model") is not None else settings.default_model
    spec = registry.get(model_name)
    unknown_model = spec is None and "model" not in bad
    if spec is None and "model" not in bad:
        errors.append(
            {"field": "model", "message": f"unknown model {model_name!r}; "
             f"known: {', '.join(registry.names())}"}
        )
    if spec is not None:
        for side in ("width", "height"):
            v = ok(side)
            if v is not None and v > spec.max_side:
                errors.append(
                    {"field": side, "message": f"must be ≤ {spec.max_side} for {spec.name}"}
                )
        w = ok("width") or spec.width
        h = ok("height") or spec.height
        if w * h > spec.max_pixels and "width" not in bad and "height" not in bad:
            errors.append(
                {"field": "width", "message": f"width × height = {w * h} exceeds "
                 f"{spec.max_pixels} pixels for {spec.name}"}
            )
        errors += _check_family(data, ok, spec)
        sched = ok("scheduler")
        if sched is not None and sched not in spec.schedulers:
            errors.append(
                {"field": "scheduler", "message": f"{sched!r} is not allowed for {spec.name}; "
                 f"allowed: {', '.join(spec.schedulers)}"}
            )
    sizes: dict[str, tuple[int, int]] = {}
    for name in ("image", "mask"):
        src = ok(name)
        if src is None:
            continue
        if src.startswith("data:"):
            try:
                sizes[name] = open_image(decode_data_uri(src, settings.max_image_bytes)).size
            except ValueError as exc:
                errors.append({"field": name, "message": str(exc)})
        else:
            why = _check_url(src, settings.allow_http) or _literal_refused(
                src, settings.egress_allowlist)
            if why:
                errors.append({"field": name, "message": why + " or a data: URI"})
    if ok("mask") is not None and data.get("image") is None:
        errors.append({"field": "mask", "message": "is only allowed with image (inpainting "
                       "repaints the masked part of image)"})
    if len(sizes) == 2 and sizes["image"] != sizes["mask"]:
        # Both inline: checked here. A URL is only fetched by the worker, which checks
        # the same and fails the job with image_invalid.
        (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
        errors.append({"field": "mask", "message": f"is {mw}×{mh} but image is {iw}×{ih}; "
                       "they must be the same size"})
    if ok("strength") is not None and data.get("image") is None:
        errors.append({"field": "strength", "message": "is only allowed with image"})
    if data.get("image") is not None and spec is not None and "strength" not in bad:
        # img2img runs int(steps × strength) denoising steps: zero of them is no image.
        steps = ok("steps") or spec.steps
        strength = ok("strength") if ok("strength") is not None else DEFAULT_STRENGTH
        if int(steps * strength) < 1:
            errors.append({"field": "strength", "message": f"strength {strength} × steps "
                           f"{steps} leaves no denoising step; raise either"})
    errors += _check_loras(ok("loras") or [], registry, spec)
    errors += _check_sweep(data, ok, spec)
    seed = ok("seed")
    n = ok("num_images")
    if seed is not None and isinstance(n, int) and seed + n - 1 > MAX_SEED:
        errors.append({"field": "seed", "message": f"seed + num_images - 1 must be ≤ {MAX_SEED}"
                       " (image i uses seed + i)"})
    hook = ok("webhook")
    if hook is not None:
        why = _check_url(hook, settings.allow_http) or _literal_refused(
            hook, settings.egress_allowlist)
        if why:
            errors.append({"field": "webhook", "message": why})
    t = ok("timeout_s")
    if t is not None and t > settings.job_timeout_s:
        errors.append({"field": "timeout_s", "message": f"must be ≤ {settings.job_timeout_s}"})
    if errors:
        raise (UnknownModel if unknown_model else InvalidRequest)(errors)

    assert req is not None and spec is not None
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
    for key in ("mask", "loras", "sweep"):
        if not out.get(key):
            out.pop(key, None)
    if req.sweep is not None:
        out["sweep"] = req.sweep.model_dump(exclude_none=True)
        if req.sweep.seeds:
            out["seed"] = req.sweep.seeds[0]
    return out


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def new_record(
    job_id: str, request: dict[str, Any], created_at: str, owner: str | None = None
) -> dict[str, Any]:
    expires_at = None
    if request.get("expires_in_s"):
        ts = parse_iso(created_at).timestamp() + request["expires_in_s"]
        expires_at = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
        expires_at = expires_at.replace("+00:00", "Z")
    return {
        "id": job_id,
        "status": Status.QUEUED.value,
        "request": request,
        "created_at": created_at,
        "started_at": None,
        "finished_at": None,
        "expires_at": expires_at,
        "attempts": 0,
        "worker": None,
        "progress": {"step": 0, "total": denoise_steps(request)},
        "outputs": [],
        "error": None,
        "timings": {},
        "metadata": request.get("metadata", {}),
        #: The API key (its id, never the key) that submitted the job; None from the
        #: Python client. Only that key sees the job through the HTTP API.
        "owner": owner,
    }
