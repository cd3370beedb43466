"""OpenAI's image requests as atelier job requests.

``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (a multipart form,
:mod:`producer.api.openai.form`) are read into :class:`GenerationBody` and
:class:`EditFields`: every field OpenAI's API reference has (openai-python 3.57), plus
atelier's own request fields a client may add (``extra_body`` in the SDKs). Then
:func:`translate` makes the atelier request, which goes through the one validation of
every job (:func:`producer.requests.generate.validate_request`). What each OpenAI field becomes
(docs/openai.md has the table):

- honoured: ``prompt``, ``model`` (a registry name, or an alias from
  ``ATELIER_OPENAI_MODEL_ALIASES``), ``n`` (``num_images``, at most 8), ``size``
  (``WIDTHxHEIGHT`` or ``auto``: the model's default; for an edit, the input's aspect
  at the model's default area), ``response_format`` (default ``b64_json``, as OpenAI's
  GPT image models answer), ``output_format`` (png, webp, jpeg), ``stream``,
  ``partial_images``, ``image`` and ``mask`` (edits: img2img, or inpainting where the
  mask is transparent);
- mapped: ``quality`` to denoising steps (a share of the model's default),
  ``output_compression`` to ``quality`` (webp, jpeg), ``user``/``safety_identifier`` to
  the job's metadata (``openai_user``);
- ignored, as OpenAI's own servers ignore what a model lacks: ``moderation``, ``style``,
  ``complexity``, ``input_fidelity``; ``background`` ``auto``/``opaque``;
- refused (400, the field named): ``background: transparent``, ``output_format`` gif or
  svg and what only they use (``frame_count``, ``frame_duration_ms``, ``svg``,
  ``markup``), more than one input image, unknown fields. The schema lists none of them
  (:data:`UNMADE`): a request it allows is one atelier makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from producer.api.openai.errors import OpenAIError
from producer.core.constraints import DISTINCT, NOT_BLANK, integral
from producer.core.contract import (
    MAX_EXPIRES_IN_S,
    MAX_LORAS,
    MAX_SEED,
    MAX_STEPS,
    LoraRef,
)
from producer.core.registry import ModelSpec, Registry
from producer.core.settings import Settings

#: ``quality`` as a share of the model's default steps (``auto``: the default).
QUALITY_STEPS = {
    "low": 0.5,
    "medium": 0.75,
    "high": 1.0,
    "auto": 1.0,
    "standard": 1.0,
    "hd": 1.5,
    "xhigh": 1.5,
    "max": 2.0,
}
#: The ``quality`` an answer reports (OpenAI's answers name one of low…max).
QUALITY_SHOWN = {"auto": "high", "standard": "high", "hd": "xhigh"}
#: atelier's request fields as OpenAI calls them, for naming a refused one.
PARAM_OF = {"width": "size", "height": "size", "num_images": "n", "quality": "output_compression"}
#: The atelier fields a client may add to an OpenAI request (``extra_body``).
EXTENSIONS = (
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "scheduler",
    "loras",
    "priority",
    "metadata",
    "webhook",
    "webhook_events",
    "timeout_s",
    "expires_in_s",
)


class _Common(BaseModel):
    """The fields both routes share (as openai-python 3.57 types them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(
        min_length=1,
        max_length=4000,
        description="What to draw (atelier: 1-4000 characters, not blank).",
        json_schema_extra=NOT_BLANK,
    )
    model: str | None = Field(
        default=None,
        description="A registry model or an alias "
        "(ATELIER_OPENAI_MODEL_ALIASES); default: the default model.",
    )
    n: int | None = Field(default=None, ge=1, le=8, description="Images (atelier: 1-8).")
    size: str | None = Field(
        default=None,
        pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$",
        description="WIDTHxHEIGHT, or auto (the model's default).",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None, description="Default b64_json."
    )
    output_format: Literal["png", "webp", "jpeg"] | None = Field(
        default=None, description="png (default), webp or jpeg; gif and svg are refused."
    )
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="webp and jpeg: atelier's quality."
    )
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = (
        Field(
            default=None,
            description="Denoising steps: low ½, medium ¾, high/auto the "
            "model's default, xhigh/hd 1½×, max 2×.",
        )
    )
    background: Literal["opaque", "auto"] | None = Field(
        default=None, description="auto or opaque; transparent is refused."
    )
    complexity: Literal["low", "medium", "high"] | None = Field(
        default=None, description="Ignored."
    )
    partial_images: int | None = Field(
        default=None, ge=0, le=3, description="Partial images streamed (from previews)."
    )
    stream: bool | None = Field(default=None, description="Answer server-sent events.")
    user: str | None = Field(
        default=None, max_length=256, description="Kept in the job's metadata (openai_user)."
    )
    safety_identifier: str | None = Field(
        default=None, max_length=256, description="As user, and preferred to it."
    )
    # atelier's own request fields (docs/contract.md "Job request"), in the ranges of
    # /v1/jobs.
    negative_prompt: str | None = Field(default=None, max_length=4000)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description="Wins over quality.")
    guidance_scale: float | None = Field(default=None, ge=0, le=30, allow_inf_nan=False)
    scheduler: str | None = None
    priority: int | None = Field(default=None, ge=0, le=9)
    webhook: str | None = None
    timeout_s: int | None = Field(default=None, ge=1)
    expires_in_s: int | None = Field(default=None, ge=1, le=MAX_EXPIRES_IN_S)

    @field_validator(
        *("n", "output_compression", "partial_images", "seed", "steps", "priority"),
        *("timeout_s", "expires_in_s"),
        mode="before",
    )
    @classmethod
    def _whole(cls, v: Any) -> Any:
        return integral(v)


class GenerationBody(_Common):
    """``POST /v1/images/generations``: JSON, so atelier's structured fields too."""

    moderation: Literal["low", "auto"] | None = Field(default=None, description="Ignored.")
    style: Literal["vivid", "natural"] | None = Field(default=None, description="Ignored.")
    loras: list[LoraRef] | None = Field(default=None, max_length=MAX_LORAS)
    metadata: dict[str, Any] | None = None
    webhook_events: list[Literal["started", "progress", "output", "completed"]] | None = Field(
        default=None, json_schema_extra=DISTINCT
    )


class EditFields(_Common):
    """``POST /v1/images/edits``, less its files: a form's fields are text, so only
    atelier's scalar fields are taken."""

    input_fidelity: Literal["high", "low"] | None = Field(default=None, description="Ignored.")
    strength: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="atelier's img2img strength (default 0.6; 1.0 with a mask).",
        json_schema_extra={"exclusiveMinimum": 0},
    )


class EditForm(EditFields):
    """The multipart form of ``POST /v1/images/edits``, as the OpenAPI document shows it."""

    image: bytes = Field(description="PNG, JPEG or WEBP (one; image[] with one file too).")
    mask: bytes | None = Field(
        default=None, description="A PNG whose transparent pixels are repainted; the size of image."
    )


@dataclass
class Ask:
    """What the answer needs that the job does not say."""

    #: ``image_generation`` or ``image_edit``: the prefix of streamed event types.
    kind: str
    response_format: str
    output_format: str
    quality: str
    background: str
    size: str
    stream: bool
    partial_images: int
    user: str | None


def parse(model: type[_Common], data: Any) -> _Common:
    """``data`` read into ``model``; 400 naming the first bad field otherwise."""
    if not isinstance(data, dict):
        raise OpenAIError(400, "The body must be a JSON object.", None, "invalid_value")
    _refuse_unmade(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _refusal(exc) from None


def _refusal(exc: ValidationError) -> OpenAIError:
    errors = exc.errors()
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return OpenAIError(400, f"Unknown parameter: '{param}'.", param, "unknown_parameter")
    if first["type"] == "missing":
        return OpenAIError(
            400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
        )
    detail = "; ".join(f"'{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in errors)
    return OpenAIError(400, f"Invalid {detail}.", param, "invalid_value")


def resolve_model(name: str | None, registry: Registry, settings: Settings) -> ModelSpec:
    """The registry model an OpenAI ``model`` names; 404 (``param: model``) if none."""
    wanted = settings.default_model if name is None else name
    spec = registry.get(settings.model_aliases.get(wanted, wanted))
    if spec is None:
        known = sorted([*registry.names(), *settings.model_aliases])
        raise OpenAIError(
            404,
            f"The model '{wanted}' does not exist; known: {', '.join(known)}.",
            "model",
            "model_not_found",
        )
    return spec


def translate(
    body: _Common, spec: ModelSpec, image_size: tuple[int, int] | None = None
) -> tuple[dict[str, Any], Ask]:
    """The atelier request of an OpenAI request for ``spec``, and what its answer needs.

    ``image_size``: an edit's input picture (``size: auto`` follows its aspect).
    Refuses (400) what atelier cannot make; the atelier request's own checks come after.
    """
    width, height = _size(body.size, spec, image_size)
    data: dict[str, Any] = {
        "prompt": body.prompt,
        "model": spec.name,
        "width": width,
        "height": height,
        "output_format": body.output_format or "png",
    }
    if body.n is not None:
        data["num_images"] = body.n
    quality = body.quality or "auto"
    data["steps"] = max(1, min(MAX_STEPS, round(spec.steps * QUALITY_STEPS[quality])))
    if body.output_compression is not None:
        data["quality"] = max(1, body.output_compression)
    for name in (*EXTENSIONS, "strength"):
        value = getattr(body, name, None)
        if value is not None:
            data[name] = value.copy() if isinstance(value, dict) else value
    if "loras" in data:
        data["loras"] = [ref.model_dump() for ref in data["loras"]]
    if body.stream and body.partial_images:
        # The partial images are the job's previews (docs/features.md "Live previews").
        data["preview"] = True
    user = body.safety_identifier or body.user
    if user:
        data["metadata"] = {**data.get("metadata", {}), "openai_user": user}
    ask = Ask(
        kind="image_edit" if image_size else "image_generation",
        response_format=body.response_format or "b64_json",
        output_format=data["output_format"],
        quality=QUALITY_SHOWN.get(quality, quality),
        background=body.background or "auto",
        size=f"{width}x{height}",
        stream=bool(body.stream),
        partial_images=body.partial_images or 0,
        user=user or None,
    )
    return data, ask


#: What OpenAI's API has and atelier does not make: none of it is in the schema, and
#: each is refused (400) by name rather than as an unknown parameter.
UNMADE = {
    "output_format": ("gif", "svg"),
    "background": ("transparent",),
}
GIF_OR_SVG_ONLY = ("frame_count", "frame_duration_ms", "svg", "markup")


def _refuse_unmade(data: dict[str, Any]) -> None:
    """400 for what atelier's models cannot make, naming the field."""
    fmt = data.get("output_format")
    if fmt in UNMADE["output_format"]:
        raise OpenAIError(
            400,
            f"output_format '{fmt}' is not made here: png, webp or jpeg.",
            "output_format",
            "invalid_value",
        )
    if data.get("background") in UNMADE["background"]:
        raise OpenAIError(
            400,
            "background 'transparent' is not made here: the models "
            "make opaque images (auto or opaque).",
            "background",
            "invalid_value",
        )
    for name in GIF_OR_SVG_ONLY:
        if data.get(name) is not None:
            raise OpenAIError(
                400,
                f"{name} is only for gif or svg output, which is not made here.",
                name,
                "invalid_value",
            )


def _size(size: str | None, spec: ModelSpec, image_size: tuple[int, int] | None) -> tuple[int, int]:
    if size is not None and size != "auto":
        w, _, h = size.partition("x")
        return int(w), int(h)
    if image_size is None:
        return spec.width, spec.height
    return fit(image_size, spec)


def fit(image_size: tuple[int, int], spec: ModelSpec) -> tuple[int, int]:
    """``size: auto`` of an edit: the input's aspect at the model's default area, each
    side a multiple of the model's and within its limits."""
    iw, ih = image_size
    step = spec.size_multiple
    scale = (spec.width * spec.height / (iw * ih)) ** 0.5
    low = max(64, step)
    w, h = (max(low, min(spec.max_side, round(v * scale / step) * step)) for v in (iw, ih))
    while w * h > spec.max_pixels and (w > low or h > low):
        w, h = max(low, w - step), max(low, h - step)
    return w, h


def form_schema() -> dict[str, Any]:
    """The OpenAPI schema of the edit form: :class:`EditForm`, each optional field a
    plain one (a form has no null: a field left out is unset)."""
    schema = EditForm.model_json_schema(ref_template="#/components/schemas/{model}")
    for prop in schema["properties"].values():
        kinds = [k for k in prop.pop("anyOf", []) if k.get("type") != "null"]
        if kinds:
            prop.update(kinds[0])
        if prop.get("default", 0) is None:
            del prop["default"]
    return schema


def param_of(field: str) -> str:
    """The OpenAI name of an atelier request field (``width`` is ``size``...)."""
    head = field.split(".")[0]
    return PARAM_OF.get(head, field)
