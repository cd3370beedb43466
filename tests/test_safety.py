"""The optional safety checker: a tiny CLIP checker whose rule the tests set."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image

from producer.core.contract import EventType, Status
from tests.helpers import BUCKET, Stack, pixels, run_job, s3_get, stack_values, worker_env
from tests.servers import RedisServer, S3Server, Worker

TINY = """
pipeline = "sdxl"
source = "builtin:tiny-sdxl"
dtype = "fp32"
scheduler = "euler"
steps = 2
guidance_scale = 5.0
width = 64
height = 64
max_side = 512
max_pixels = 262144
"""
MODELS = f"""
[models."tiny-blur"]
{TINY}
[models."tiny-withhold"]
{TINY}
safety_action = "withhold"
[models."tiny-unchecked"]
{TINY}
safety_action = "off"
"""


def test_checker_flags_by_the_rule_it_was_built_with(tmp_path: Path) -> None:
    from worker.builtin.tiny import build_tiny_safety_checker
    from worker.diffusion.safety import ClipSafetyChecker

    rng = np.random.default_rng(0)
    images = [
        Image.new("RGB", (64, 64), (255, 0, 0)),
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
        Image.new("RGB", (64, 64), (0, 0, 255)),
    ]
    scores = ClipSafetyChecker(str(build_tiny_safety_checker(tmp_path / "s"))).scores(images)
    assert len(set(scores)) == 3
    cut = sorted(scores)[1] + 0.01  # between the middle score and the highest
    assert sorted(scores)[2] - cut > 0.005  # (the checker rounds to 3 decimals)
    checker = ClipSafetyChecker(str(build_tiny_safety_checker(tmp_path / "t", cut)))
    assert checker.check(images) == [s > cut for s in scores]
    assert sum(checker.check(images)) == 1
    never = ClipSafetyChecker(str(build_tiny_safety_checker(tmp_path / "n", 1.0)))
    assert never.check(images) == [False, False, False]


@pytest.fixture(scope="module")
def checked(
    session_dir: Path, redis_server: RedisServer, s3_server: S3Server, models_dir: Path
) -> Iterator[Stack]:
    """A worker whose checker flags every image (threshold -1), blurring by default."""
    models_file = session_dir / "safety-models.toml"
    models_file.write_text(MODELS)
    values = stack_values(
        redis_server.url,
        models_dir,
        str(models_file),
        f"s3://{BUCKET}/outputs",
        s3_server.endpoint,
        safety_checker="builtin:tiny-safety-checker@-1",
        safety_action="blur",
        default_model="tiny-blur",
    )
    worker = Worker(
        worker_env(values),
        session_dir / "logs" / "safety.log",
        ["tiny-blur", "tiny-withhold", "tiny-unchecked"],
    )
    worker.start()
    try:
        yield Stack(values, worker)
    finally:
        worker.stop()


@pytest.mark.slow
def test_flagged_images_are_blurred_or_withheld(checked: Stack) -> None:
    from worker.diffusion.safety import blur

    req: dict[str, Any] = {"prompt": "a bowl of fruit", "seed": 6, "num_images": 2}
    raw, _ = run_job(checked, model="tiny-unchecked", **req)
    blurred, _ = run_job(checked, model="tiny-blur", **req)
    withheld, events = run_job(checked, model="tiny-withhold", **req)
    for r in (raw, blurred, withheld):
        assert r["status"] == Status.SUCCEEDED, r

    assert all("nsfw" not in o for o in raw["outputs"])  # off for this model

    for o, r in zip(blurred["outputs"], raw["outputs"], strict=True):
        assert o["nsfw"] is True and o["blurred"] is True and o["key"]
        stored = Image.open(io.BytesIO(s3_get(checked, o["key"])))
        original = Image.open(io.BytesIO(s3_get(checked, r["key"]))).convert("RGB")
        assert pixels(stored) == pixels(blur(original))
        assert pixels(stored) != pixels(original)

    s3 = boto3.client("s3", endpoint_url=checked.settings.s3_endpoint_url)
    stored_keys = {
        o["Key"]
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"outputs/{withheld['id']}/").get(
            "Contents", []
        )
    }
    assert stored_keys == {f"outputs/{withheld['id']}/manifest.json"}  # no image at all
    for o in withheld["outputs"]:
        assert o["nsfw"] is True and o["withheld"] is True
        assert o["key"] is None and o["url"] is None and o["bytes"] == 0
    said = [e["data"]["output"] for e in events if e["type"] == EventType.OUTPUT]
    assert [o["withheld"] for o in said] == [True, True]
    manifest = json.loads(s3_get(checked, f"outputs/{withheld['id']}/manifest.json"))
    assert manifest["safety"] == {
        "checker": "builtin:tiny-safety-checker@-1",
        "action": "withhold",
        "flagged": [0, 1],
    }


@pytest.mark.slow
def test_withheld_sweep_cells_show_as_grey_on_the_sheet(checked: Stack) -> None:
    record, _ = run_job(
        checked, model="tiny-withhold", prompt="a bowl of fruit", sweep={"seeds": [1, 2]}
    )
    assert record["status"] == Status.SUCCEEDED, record
    cells, sheet = record["outputs"][:2], record["outputs"][2]
    assert all(o["withheld"] for o in cells)
    grid = Image.open(io.BytesIO(s3_get(checked, sheet["key"]))).convert("RGB")
    tile: Any = grid.crop((0, grid.height - 64, 64, grid.height))
    assert tile.getcolors() == [(64 * 64, (128, 128, 128))]
