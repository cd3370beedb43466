"""The multipart form of ``POST /v1/images/edits``: read under the body limit, its text
fields typed as OpenAI's SDKs write them, its pictures checked by the image guards.

The SDKs send every field as text (``n=2``, ``stream=true``), arrays as ``name[]``
(``image[]`` when a list of files is given) and objects as ``name[key]``. The input
picture becomes an inline ``image`` of the job; OpenAI's mask (transparent where to
repaint) becomes atelier's (white where to repaint), :func:`producer.core.images.alpha_mask`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from producer.api.openai.errors import OpenAIError
from producer.api.submit import read_body
from producer.core.images import alpha_mask, open_image

INTS = {
    "n",
    "partial_images",
    "output_compression",
    "seed",
    "steps",
    "priority",
    "timeout_s",
    "expires_in_s",
    "frame_count",
    "frame_duration_ms",
}
FLOATS = {"guidance_scale", "strength"}
BOOLS = {"stream"}
FILES = ("image", "mask", "markup")
#: Text fields a form may carry (each at most 1 MiB, Starlette's part limit).
MAX_FIELDS = 64


@dataclass
class EditRequest:
    """The form's text fields, typed; the input picture and its size; the mask as
    atelier's; and what an ``Idempotency-Key`` is bound to."""

    fields: dict[str, Any]
    image: str
    image_size: tuple[int, int]
    mask: str | None
    fingerprint: dict[str, Any]


async def read_form(request: Request, limit: int, max_image_bytes: int) -> EditRequest:
    """The edit form of ``request``: 413 past ``limit`` bytes, 400 naming a bad part."""
    body = await _read_body(request, limit)

    async def replay() -> AsyncGenerator[bytes, None]:
        yield body

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise OpenAIError(400, "The body must be multipart/form-data.", None, "invalid_value")
    try:
        form = await MultiPartParser(
            request.headers, replay(), max_files=len(FILES) + 1, max_fields=MAX_FIELDS
        ).parse()
    except MultiPartException as exc:
        raise OpenAIError(
            400, f"The form is not readable: {exc.message}", None, "invalid_value"
        ) from None
    try:
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        for key, value in form.multi_items():
            name = key.removesuffix("[]")
            if isinstance(value, UploadFile):
                if name not in FILES:
                    raise OpenAIError(
                        400, f"Unknown file parameter: '{name}'.", name, "unknown_parameter"
                    )
                if name in files:
                    raise OpenAIError(
                        400, f"One {name} is taken here, not several.", name, "invalid_value"
                    )
                files[name] = await value.read()
            else:
                _put(fields, key, value)
    finally:
        await form.close()
    return _edit_request(fields, files, max_image_bytes)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = OpenAIError(413, f"The body is larger than {limit} bytes.", None, "payload_too_large")
    return await read_body(request, limit, too_big)


def _put(fields: dict[str, Any], key: str, text: str) -> None:
    """One text part into ``fields``: typed, ``name[]`` into a list, ``name[k]`` into
    an object."""
    if key.endswith("[]"):
        fields.setdefault(key[:-2], []).append(text)
    elif "[" in key and key.endswith("]"):
        name, _, sub = key[:-1].partition("[")
        target = fields.setdefault(name, {})
        if isinstance(target, dict):
            target[sub] = text
    else:
        fields[key] = _typed(key, text)


def _typed(name: str, text: str) -> Any:
    """A text part as the type its field has (an integer may be written ``3.0``, as JSON
    Schema's integers may); left as text when it is not one (the field's check then
    names it)."""
    try:
        if name in INTS:
            number = float(text) if "." in text or "e" in text.lower() else int(text)
            return int(number) if isinstance(number, float) and number.is_integer() else number
        if name in FLOATS:
            return float(text)
    except ValueError:
        return text
    if name in BOOLS and text in ("true", "false"):
        return text == "true"
    return text


def _edit_request(
    fields: dict[str, Any], files: dict[str, bytes], max_image_bytes: int
) -> EditRequest:
    if "markup" in files:
        raise OpenAIError(400, "markup is not taken here.", "markup", "invalid_value")
    for name in FILES:
        if name in fields:
            raise OpenAIError(400, f"{name} must be a file.", name, "invalid_value")
    if "image" not in files:
        raise OpenAIError(
            400, "Missing required parameter: 'image'.", "image", "missing_required_parameter"
        )
    for name, raw in files.items():
        if len(raw) > max_image_bytes:
            raise OpenAIError(
                400, f"{name} is larger than {max_image_bytes} bytes.", name, "invalid_value"
            )
    try:
        size = open_image(files["image"]).size
    except ValueError as exc:
        raise OpenAIError(400, f"image {exc}.", "image", "invalid_value") from None
    mask = None
    if "mask" in files:
        try:
            mask = _data_uri(alpha_mask(files["mask"]), "image/png")
        except ValueError as exc:
            raise OpenAIError(400, f"mask {exc}.", "mask", "invalid_value") from None
    fingerprint = {
        **fields,
        **{name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()},
    }
    return EditRequest(fields, _data_uri(files["image"], "image/png"), size, mask, fingerprint)


def _data_uri(raw: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"
