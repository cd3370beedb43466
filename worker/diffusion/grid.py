"""The contact sheet of a sweep: every cell's image in a grid, axes labelled.

Like SD.Next's XYZ grid: the first sweep axis runs along the columns, the second along
the rows; labels use Pillow's default font. Deterministic: same images, same sheet.
"""

from __future__ import annotations

from typing import Any

NAMES = {"seeds": "seed", "guidance_scale": "guidance", "steps": "steps"}
PAD = 4


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # a Pillow without FreeType
        return ImageFont.load_default()


def label(axis: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{NAMES.get(axis, axis)} {value}"


def contact_sheet(images: list[Any], cells: list[dict[str, Any]]) -> Any:
    """One RGB image: column labels on top, row labels on the left, cells row by row."""
    from PIL import Image, ImageDraw

    axes = list(cells[0]["label"])
    cols = list(dict.fromkeys(c["label"][axes[0]] for c in cells))
    rows = list(dict.fromkeys(c["label"][axes[1]] for c in cells)) if len(axes) > 1 else []
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    font = _font(max(10, min(24, w // 10)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return int(right - left), int(bottom - top)

    col_text = [label(axes[0], v) for v in cols]
    row_text = [label(axes[1], v) for v in rows]
    top = max(size(t)[1] for t in col_text) + 2 * PAD
    left = (max(size(t)[0] for t in row_text) + 2 * PAD) if rows else 0
    n_rows = max(1, len(rows))
    sheet = Image.new("RGB", (left + len(cols) * w, top + n_rows * h), "white")
    draw = ImageDraw.Draw(sheet)
    for x, text in enumerate(col_text):
        tw, _ = size(text)
        draw.text((left + x * w + (w - tw) // 2, PAD), text, fill="black", font=font)
    for y, text in enumerate(row_text):
        _, th = size(text)
        draw.text((PAD, top + y * h + (h - th) // 2), text, fill="black", font=font)
    for i, im in enumerate(images):
        y, x = divmod(i, len(cols))
        sheet.paste(im.convert("RGB"), (left + x * w, top + y * h))
    return sheet
