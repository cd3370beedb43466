"""Input images: ``data:`` URIs and Pillow decoding, bounded and restricted.

The API decodes an inline ``image``/``mask`` once to check it; the worker decodes what
it fetched. Both go through :func:`open_image`, so a picture refused by one is refused
by the other for the same reason.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

#: Decoders Pillow may use for init images; everything else is refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
#: Pixels an input image may have (Pillow's decompression-bomb limit stays on too).
MAX_INPUT_PIXELS = 4096 * 4096


def decode_data_uri(value: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:image/...;base64,`` URI; ValueError says what is wrong."""
    head, sep, payload = value.partition(",")
    if (
        not sep
        or not head.startswith("data:")
        or not head[5:].lower().startswith("image/")
        or not head.endswith(";base64")
    ):
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


def open_image(raw: bytes, max_pixels: int = MAX_INPUT_PIXELS) -> Any:
    """Decode an init image with Pillow, restricted to PNG/JPEG/WEBP and bounded in size."""
    return _decode(raw, max_pixels).convert("RGB")


def alpha_mask(raw: bytes, max_pixels: int = MAX_INPUT_PIXELS) -> bytes:
    """An OpenAI edit mask (its fully transparent pixels are the ones to repaint) as
    atelier's mask (white is repainted, black kept), a greyscale PNG: white where the
    mask is transparent, black where it is opaque, grey between.

    ValueError when the picture has no alpha channel (OpenAI refuses such a mask too).
    """
    from PIL import Image

    img = _decode(raw, max_pixels)
    if "A" not in img.getbands() and "transparency" not in img.info:
        raise ValueError("has no alpha channel (its transparent pixels mark what to repaint)")
    alpha = img.convert("RGBA").getchannel("A")
    out = io.BytesIO()
    Image.eval(alpha, lambda a: 255 - a).save(out, "PNG")
    return out.getvalue()


def _decode(raw: bytes, max_pixels: int) -> Any:
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
    return img
