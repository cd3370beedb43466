"""The generation parameters of a request: what decides the pixels, and what a PNG's
``atelier`` chunk records (worker/diffusion/encode)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The request fields that decide the pixels: what a PNG's ``atelier`` chunk records.
#: Delivery fields (webhook, priority, timeout, expiry, metadata) and the input images
#: stay out, so two jobs that generate the same picture give the same bytes.
GENERATION_PARAMS = (
    "model",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "scheduler",
    "seed",
    "num_images",
    "strength",
    "loras",
    "sweep",
    "control",
    "references",
)


def generation_params(request: Mapping[str, Any]) -> dict[str, Any]:
    """The generation parameters of a normalized request (see :data:`GENERATION_PARAMS`);
    control and reference entries without their images (input images stay out)."""
    out = {k: request[k] for k in GENERATION_PARAMS if k in request}
    for key in ("control", "references"):
        if key in out:
            out[key] = [{k: v for k, v in e.items() if k != "image"} for e in out[key]]
    return out
