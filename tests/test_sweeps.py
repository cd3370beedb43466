"""Parameter sweeps: one job over a grid, every image plus a labelled contact sheet."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from PIL import Image

from producer.core.contract import EventType, Status
from tests.helpers import Stack, pixels, png_text, run_job, s3_get

pytestmark = pytest.mark.slow


def image(stack: Stack, output: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(s3_get(stack, output["key"])))


def darkest(img: Image.Image) -> float:
    """The lowest value of the image in greyscale (``getextrema`` of one band)."""
    low, _ = img.convert("L").getextrema()
    assert isinstance(low, (int, float))  # one band: a (min, max) pair of numbers
    return low


def test_two_axis_sweep(stack: Stack) -> None:
    record, events = run_job(
        stack, prompt="a paper boat", steps=2, sweep={"seeds": [1, 2], "guidance_scale": [3, 7.5]}
    )
    assert record["status"] == Status.SUCCEEDED, record
    outs = record["outputs"]
    assert len(outs) == 5 and [o["index"] for o in outs] == [0, 1, 2, 3, 4]
    # row by row: seeds along the columns, guidance along the rows
    assert [o["sweep"] for o in outs[:4]] == [
        {"seeds": 1, "guidance_scale": 3.0},
        {"seeds": 2, "guidance_scale": 3.0},
        {"seeds": 1, "guidance_scale": 7.5},
        {"seeds": 2, "guidance_scale": 7.5},
    ]
    assert [o["seed"] for o in outs[:4]] == [1, 2, 1, 2]
    assert len({o["sha256"] for o in outs}) == 5
    sheet = outs[4]
    assert sheet["contact_sheet"] is True and sheet["seed"] is None and "sweep" not in sheet
    assert record["progress"] == {"step": 8, "total": 8}  # 4 cells × 2 steps
    assert [e["type"] for e in events].count(EventType.OUTPUT) == 5
    manifest = json.loads(s3_get(stack, f"outputs/{record['id']}/manifest.json"))
    assert manifest["seeds"] == [1, 2, 1, 2]
    assert record["request"]["sweep"] == {"seeds": [1, 2], "guidance_scale": [3.0, 7.5]}

    # a cell is exactly the job of its own parameters
    alone, _ = run_job(stack, prompt="a paper boat", steps=2, seed=2, guidance_scale=7.5)
    cell = image(stack, outs[3])
    assert pixels(cell) == pixels(image(stack, alone["outputs"][0]))
    assert "CFG scale: 7.5, Seed: 2," in png_text(cell)["parameters"]

    # the sheet holds every cell at its place, beside room for the labels
    grid = image(stack, sheet).convert("RGB")
    left, top = grid.width - 2 * 64, grid.height - 2 * 64
    assert left > 0 and top > 0
    for i, out in enumerate(outs[:4]):
        y, x = divmod(i, 2)
        box = (left + x * 64, top + y * 64, left + (x + 1) * 64, top + (y + 1) * 64)
        assert pixels(grid.crop(box)) == pixels(image(stack, out))
    # and the label areas carry text (dark pixels on white)
    assert darkest(grid.crop((left, 0, grid.width, top))) < 128
    assert darkest(grid.crop((0, top, left, grid.height))) < 128


def test_steps_sweep_one_axis(stack: Stack) -> None:
    record, _ = run_job(stack, prompt="a paper boat", seed=9, sweep={"steps": [1, 3]})
    assert record["status"] == Status.SUCCEEDED, record
    assert [o.get("sweep") for o in record["outputs"]] == [{"steps": 1}, {"steps": 3}, None]
    assert record["progress"] == {"step": 4, "total": 4}
    grid = image(stack, record["outputs"][2])
    assert grid.width == 2 * 64 and grid.height > 64  # one row: no row labels
