"""What the request checks share: :class:`Fields` (the raw request, and which fields
failed their own checks), pydantic's errors by field, and the checks of the URLs a job
may call (input images, webhooks) and of its input images' sources."""

from __future__ import annotations

import ipaddress
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from producer.core.images import decode_data_uri, open_image
from producer.core.netguard import is_public, parse_allowlist
from producer.core.registry import ModelSpec, Registry
from producer.core.settings import Settings

__all__ = ["FieldError", "Fields", "check_source", "field_errors", "loc", "refused_url"]

#: One refusal: ``{"field": "width", "message": "..."}``.
FieldError = dict[str, str]


class Fields:
    """The raw request (as its shape read it, once the whole shape passed: an integer
    sent as 3.0 is 3), and which of its top-level fields failed their own checks."""

    def __init__(self, data: dict[str, Any], errors: list[FieldError], shape: Any = None) -> None:
        shaped = shape.model_dump() if isinstance(shape, BaseModel) else {}
        self.data = {k: shaped.get(k, v) for k, v in data.items()}
        self.failed = {e["field"].split(".")[0] for e in errors}

    def valid(self, name: str) -> Any:
        """The raw value of a field that passed its own checks, else None."""
        return None if name in self.failed else self.data.get(name)

    def given(self, name: str) -> bool:
        """Whether the request set ``name`` at all (valid or not)."""
        return self.data.get(name) is not None


def loc(path: tuple[int | str, ...]) -> str:
    """A pydantic error location as the field it names: ``loras.0.name``; ``body`` for
    the whole request."""
    return ".".join(str(p) for p in path) or "body"


def field_errors(exc: ValidationError) -> list[FieldError]:
    """pydantic's errors, each under the field it names (``unknown field`` for one the
    shape does not have)."""
    return [
        {
            "field": loc(e["loc"]),
            "message": "unknown field" if e["type"] == "extra_forbidden" else e["msg"],
        }
        for e in exc.errors()
    ]


Shape = TypeVar("Shape", bound=BaseModel)


def parse(shape: type[Shape], data: dict[str, Any]) -> tuple[Shape | None, list[FieldError]]:
    """``data`` read as the request model ``shape``, or every field it refuses."""
    try:
        return shape.model_validate(data), []
    except ValidationError as exc:
        return None, field_errors(exc)


def resolve_model(
    fields: Fields, registry: Registry, settings: Settings
) -> tuple[ModelSpec | None, list[FieldError]]:
    """The model that runs the job (``model``, else the default), or the error that names
    an unknown one."""
    if "model" in fields.failed:
        return None, []
    name = fields.valid("model") if fields.given("model") else settings.default_model
    spec = registry.get(name)
    if spec is not None:
        return spec, []
    return None, [
        {
            "field": "model",
            "message": f"unknown model {name!r}; known: {', '.join(registry.names())}",
        }
    ]


def check_source(
    name: str, src: str, settings: Settings, errors: list[FieldError]
) -> tuple[int, int] | None:
    """An input image's source: a ``data:`` URI decoded (its size returned) or a URL the
    worker may fetch; what is wrong is appended to ``errors`` under ``name``."""
    if src.startswith("data:"):
        try:
            size: tuple[int, int] = open_image(decode_data_uri(src, settings.max_image_bytes)).size
            return size
        except ValueError as exc:
            errors.append({"field": name, "message": str(exc)})
    elif why := refused_url(src, settings):
        errors.append({"field": name, "message": why + " or a data: URI"})
    return None


def refused_url(value: str, settings: Settings) -> str | None:
    """Why ``value`` may not be called (as an image source or a webhook), or None."""
    return _check_url(value, settings.allow_http) or _literal_refused(
        value, settings.egress_allowlist
    )


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
