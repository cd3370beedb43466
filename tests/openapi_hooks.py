"""schemathesis hooks of tests/test_openapi.py: a schema-valid submit may be refused only
for what JSON Schema cannot say, and each such refusal is named here.

The document states every limit it can (the request models, and the registry's and
settings' limits from producer/api/limits.py). What is left, and so what a generated
client cannot know in advance, is docs/api.md's "What the schema cannot say": one
model's own limits, rules between fields, input images that must decode, addresses that
must be public. :func:`refused_only_beyond_the_schema` fails a positive (schema-valid)
case that is refused for anything else, as schemathesis's own ST202 would.
"""

from __future__ import annotations

import json
import re
from typing import Any

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import is_unexpected_http_status_case

_SOURCE = r"image|mask|control\.\d+\.image|references\.\d+\.image"
#: What an input image's check says of an image that does not decode, and of an address
#: that is not public.
_UNDECODED = (
    r"^(must be a data:\S+ URI|is larger than \d+ bytes|is not valid base64|is \d+×\d+; at most"
    r"|is too large to decode|is not a readable|has no alpha|points at .*not a public address"
    r"|holds |entry |is not a readable zip)"
)
#: (field, message) patterns of the refusals the schema cannot state: a job's.
JOB: list[tuple[str, str]] = [
    # one model's own limits (the schema has the largest of any model's)
    (r"width|height", r" for \S+$|^width × height = \d+ exceeds \d+ pixels for "),
    (r"scheduler", r"is not allowed for "),
    (r"guidance_scale", r"^must be 0 for "),
    (r"negative_prompt", r"guidance-distilled|^has no effect at guidance_scale"),
    (r"prompt|negative_prompt", r"^weighting syntax \(text:1\.3\) is not read by "),
    (r"sweep\.guidance_scale", r"runs without guidance: nothing to sweep$"),
    (r"loras\.\d+\.name", r"^'.*' is for \S+ models"),
    (r"control|references", r" takes none; only |has no ip_adapter|takes no reference images"),
    (r"control\.\d+\.name", r"^'.*' is for \S+ models"),
    (r"references\.\d+\.mode", r" takes mode full only"),
    # rules between fields
    (r"strength|sweep\.steps", r"leaves no denoising step"),
    (r"mask", r"^is \d+×\d+ but image is \d+×\d+"),
    (r"loras\.\d+\.name", r"^'.*' is repeated$"),
    (r"sweep", r"^give one or two axes of |^makes \d+ images; at most "),
    (r"num_images", r"^must be 1 with sweep"),
    (r"seed|steps|guidance_scale", r"^leave it out with sweep\."),
    (r"seed", r"^seed \+ num_images - 1 must be"),
    (r"control\.\d+\.end", r"^must be greater than start$"),
    (r"metadata", r"^is \d+ bytes as JSON; the limit is "),
    # what the store holds: a job: LoRA names a training of the caller's that succeeded
    (r"loras\.\d+\.name", r"^no training '|is not a training$|not succeeded: it has no adapter$"),
    # input images that must decode, addresses that must be public
    (_SOURCE, _UNDECODED),
    (r"webhook", r"points at .*not a public address"),
]
#: A training's.
TRAIN: list[tuple[str, str]] = [
    (r"resolution", r" for \S+$"),
    (r"images\.\d+", r"^a \.zip must be the only entry of images$"),
    (r"captions", r"^gives \d+ captions for \d+ images"),
    (r"lr_warmup_steps", r"^must be ≤ steps"),
    (r"metadata", r"^is \d+ bytes as JSON; the limit is "),
    (r"images\.\d+", _UNDECODED),
    (r"webhook", r"points at .*not a public address"),
]
#: An OpenAI route's, by the atelier field (or the OpenAI parameter) it names.
OPENAI: list[tuple[str, str]] = [
    *JOB,
    (r"size", r" for \S+$|^width × height"),
    (r"image|mask", r"^(image|mask) (is not a readable|has no alpha|is \d+×\d+; at most|is too)"),
]
RULES = {
    "/v1/jobs": JOB,
    "/v1/trainings": TRAIN,
    "/v1/images/generations": OPENAI,
    "/v1/images/edits": OPENAI,
}
#: An OpenAI message's parts: 'param' (field): message; ...
_PART = re.compile(r"'([^']+)'(?: \(([^)]+)\))?: (.*?)(?=; '|\.$)")


def _fields(path: str, body: dict[str, Any]) -> list[tuple[str, str]] | None:
    """The (field, message) pairs a refusal names; None where it names none."""
    error = body.get("error")
    if not isinstance(error, dict):
        return None
    if not path.startswith("/v1/images/"):
        return [(f["field"], f["message"]) for f in error.get("fields") or []] or None
    message = error.get("message", "")
    parts = [(field or param, text) for param, field, text in _PART.findall(message)]
    if not parts and error.get("param") in ("image", "mask"):
        parts = [(error["param"], message.rstrip("."))]
    return parts or None


def _beyond(field: str, message: str, rules: list[tuple[str, str]]) -> bool:
    return any(re.fullmatch(f, field) and re.search(m, message) for f, m in rules)


@schemathesis.check
def refused_only_beyond_the_schema(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schema-valid submit refused (400 or 422) for what the schema could have said."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or is_unexpected_http_status_case(case):
        return None
    if response.status_code not in (400, 422):
        return None
    path = case.operation.path
    rules = RULES.get(path)
    if rules is None:  # no submit: schemathesis's own ST202 judges it
        return None
    try:
        body = json.loads(response.text)
    except ValueError:
        body = {}
    fields = _fields(path, body) if isinstance(body, dict) else None
    stated = [f"{f}: {m}" for f, m in fields or [] if not _beyond(f, m, rules)]
    if fields and not stated:
        return None
    raise RejectedPositiveData(
        operation=case.operation.label,
        message="A schema-valid request was refused for what the schema could say: "
        + ("; ".join(stated) if stated else response.text[:500]),
        status_code=response.status_code,
        allowed_statuses=["2xx", "400/422 for what the schema cannot say"],
    )
