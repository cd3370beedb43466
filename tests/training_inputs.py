"""The subject the training tests learn: two PNGs with a pattern, as data URIs, a zip of
files as one, and its instance prompt."""

from __future__ import annotations

import io
import zipfile

from PIL import Image

from tests.helpers import data_uri, png

PROMPT = "a photo of sks dog"


def photo(color: tuple[int, int, int], size: tuple[int, int] = (80, 64)) -> bytes:
    """A PNG with a pattern to learn, not a flat colour."""
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):
        for y in range(0, size[1], 16):
            img.putpixel((x, y), (255 - color[0], 255 - color[1], 255 - color[2]))
    return png(img)


def zip_uri(entries: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return data_uri(buf.getvalue(), "application/zip")


PHOTOS = [photo((200, 40, 40)), photo((180, 60, 30), (64, 96))]
SUBJECT = [data_uri(p) for p in PHOTOS]
