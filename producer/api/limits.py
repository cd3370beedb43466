"""The limits this API's registry and settings set, written into its OpenAPI document.

The request models say what holds everywhere; what depends on the running deployment is
added here, when the document is first served: the models the registry has (and which
of them train), the largest side any model takes, every scheduler some model allows, the
ControlNets and LoRAs it names, the timeout caps, and the URL schemes allowed
(``ATELIER_ALLOW_HTTP``). A request the document allows then fails only a check it
cannot state: one of a model's own limits, a rule between fields, an input image that
does not decode, an address that is not public (docs/api.md, "What the schema cannot
say").
"""

from __future__ import annotations

import re
from typing import Any

from producer.core.families import TRAINABLE_PIPELINES
from producer.core.registry import Registry
from producer.core.settings import Settings

#: A host name or an IPv4 literal (the address guard refuses a private one), then a port,
#: then anything up to a bound that keeps the URL under 2048 characters.
_HOST = r"[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63}){0,7}"
_REST = r"(:[0-9]{1,5})?([/?#][^\s]{0,1400})?"
_BASE64 = r";base64,[A-Za-z0-9+/=]*"
#: A relative object key without a ``..`` segment or a backslash.
_KEY = r"([^/\\]*[^/\\.][^/\\]*/)*[^/\\]*"


def _literal(text: str) -> str:
    """``text`` as a pattern that matches it alone (ECMA-262 escapes only)."""
    return re.sub(r"([.^$*+?()\[\]{}|\\/])", r"\\\1", text)


def _ci(word: str) -> str:
    """``word`` in any case, as a pattern (JSON Schema's patterns take no flags)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else _literal(c) for c in word)


def url(allow_http: bool) -> str:
    """An outbound URL (an image to fetch, a webhook) as the checks take one."""
    scheme = "https?" if allow_http else "https"
    return f"{scheme}://{_HOST}{_REST}"


def patterns(settings: Settings) -> dict[str, str]:
    """The patterns of the fields that name a source: by what the field takes."""
    link = url(settings.allow_http)
    image = f"data:{_ci('image/')}[^,;]*{_BASE64}"
    zipped = f"data:{_ci('application/')}({_ci('x-')})?{_ci('zip')}[^,;]*{_BASE64}"
    suffix = "|".join(_ci(s) for s in ("png", "jpg", "jpeg", "webp", "zip"))
    return {
        "webhook": f"^{link}$",
        "image": f"^({link}|{image})$",
        "train_image": f"^({link}|{image}|{zipped}|storage:{_KEY}\\.({suffix}))$",
    }


def _narrow(prop: dict[str, Any], **limits: Any) -> None:
    """Add ``limits`` to a property, inside the non-null branch of a nullable one."""
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    (branches[0] if branches else prop).update(limits)


def _body(spec: dict[str, Any], path: str, media: str = "application/json") -> dict[str, Any]:
    schema: dict[str, Any] = spec["paths"][path]["post"]["requestBody"]["content"][media]["schema"]
    return schema


def _lora_names(registry: Registry) -> str:
    names = [_literal(n) for n in registry.lora_names()]
    return "^(" + "|".join(["job:[0-9a-f]{32}", f"storage:{_KEY}\\.safetensors", *names]) + ")$"


def _largest_side(registry: Registry, names: list[str] | None = None) -> int:
    """The largest ``max_side`` of the models ``names`` (default: every model)."""
    specs = [registry.get(n) for n in (registry.names() if names is None else names)]
    return max(s.max_side for s in specs if s is not None)


def _size_pattern(registry: Registry) -> str:
    """OpenAI's ``size``: ``auto``, or ``WxH`` with each side a width /v1/jobs takes (a
    multiple of 8 from 64 to the largest side of any model)."""
    sides = "|".join(str(v) for v in range(64, _largest_side(registry) + 1, 8))
    return f"^(auto|({sides})x({sides}))$"


def _job_fields(props: dict[str, Any], settings: Settings, registry: Registry) -> None:
    """The limits of the job request's own fields (``/v1/jobs`` and the OpenAI routes)."""
    specs = [registry.get(n) for n in registry.names()]
    side = _largest_side(registry)
    schedulers = sorted({x for s in specs if s is not None for x in s.schedulers})
    found = patterns(settings)
    for name, limits in (
        ("width", {"maximum": side}),
        ("height", {"maximum": side}),
        ("scheduler", {"enum": schedulers}),
        ("timeout_s", {"maximum": settings.job_timeout_s}),
        ("webhook", {"pattern": found["webhook"]}),
        ("image", {"pattern": found["image"]}),
        ("mask", {"pattern": found["image"]}),
    ):
        prop = props.get(name)
        if prop is not None and prop.get("format") != "binary":  # an edit's image is a file
            _narrow(prop, **limits)


def apply(spec: dict[str, Any], settings: Settings, registry: Registry) -> None:
    """Write the registry's and the settings' limits into the OpenAPI document ``spec``."""
    found = patterns(settings)
    names = registry.names()
    trainable = [n for n in names if (s := registry.get(n)) and s.pipeline in TRAINABLE_PIPELINES]
    job = _body(spec, "/v1/jobs")["properties"]
    _narrow(job["model"], enum=names)
    _job_fields(job, settings, registry)
    for path, media in (
        ("/v1/images/generations", "application/json"),
        ("/v1/images/edits", "multipart/form-data"),
    ):
        props = _body(spec, path, media)["properties"]
        _narrow(props["model"], enum=sorted([*names, *settings.model_aliases]))
        _narrow(props["size"], pattern=_size_pattern(registry))
        _job_fields(props, settings, registry)
    train = _body(spec, "/v1/trainings")["properties"]
    if trainable:
        _narrow(train["model"], enum=trainable)
        _narrow(train["resolution"], maximum=_largest_side(registry, trainable))
    train["images"]["items"]["pattern"] = found["train_image"]
    _narrow(train["timeout_s"], maximum=settings.train_timeout_s)
    _narrow(train["webhook"], pattern=found["webhook"])
    schemas = spec["components"]["schemas"]
    schemas["LoraRef"]["properties"]["name"]["pattern"] = _lora_names(registry)
    for ref in ("ControlRef", "ReferenceRef"):
        schemas[ref]["properties"]["image"]["pattern"] = found["image"]
    controlnets = registry.controlnet_names()
    if controlnets:
        schemas["ControlRef"]["properties"]["name"]["enum"] = controlnets
    else:
        job["control"]["maxItems"] = 0
