"""Image encoding: PNG (with the generation parameters in text chunks), WEBP, JPEG."""

from __future__ import annotations

import io
import json
from typing import Any

from producer.core.params import generation_params


def parameters_text(request: dict[str, Any], seed: int | None) -> str:
    """The A1111-style ``parameters`` string many image tools read."""
    text: str = request["prompt"]
    if request.get("negative_prompt"):
        text += f"\nNegative prompt: {request['negative_prompt']}"
    text += (
        f"\nSteps: {request['steps']}, Sampler: {request['scheduler']}, "
        f"CFG scale: {request['guidance_scale']}, Seed: {'sweep' if seed is None else seed}, "
        f"Size: {request['width']}x{request['height']}, Model: {request['model']}"
    )
    if request.get("image"):
        text += f", Denoising strength: {request['strength']}"
    return text


def encode(
    image: Any, request: dict[str, Any], seed: int | None, png_compress_level: int = 6
) -> bytes:
    """Encode one PIL image in the requested format. Same input, same bytes."""
    from PIL.PngImagePlugin import PngInfo

    fmt = request["output_format"]
    buf = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", parameters_text(request, seed))
        # The generation parameters only (no job id, no delivery fields): two jobs that
        # generate the same picture give the same bytes.
        params = generation_params(request)
        info.add_text("atelier", json.dumps({"seed": seed, "request": params}, sort_keys=True))
        image.save(buf, format="PNG", pnginfo=info, compress_level=png_compress_level)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=request["quality"], method=4)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=request["quality"], optimize=False)
    else:  # the contract refuses anything else before it gets here
        raise ValueError(f"unknown output_format {fmt!r}")
    return buf.getvalue()
