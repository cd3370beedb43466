"""Inpainting through the worker: image + mask, checked against diffusers alone."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.core.contract import Status
from tests.helpers import (
    Stack,
    bare_run,
    data_uri,
    mask_image,
    pixels,
    png,
    run_job,
    s3_get,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, server.server_address[1]
    finally:
        server.shutdown()
        thread.join(5)


def test_inpaint_equals_diffusers_and_the_mask_matters(stack: Stack, bare_pipe: Any) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline

    image = data_uri(png((200, 30, 30)))
    mask_png = png(mask_image())
    mask = data_uri(mask_png)
    req: dict[str, Any] = {
        "prompt": "a garden",
        "seed": 5,
        "steps": 4,
        "image": image,
        "strength": 0.75,
    }
    inpaint, _ = run_job(stack, **req, mask=mask)
    img2img, _ = run_job(stack, **req)
    assert inpaint["status"] == img2img["status"] == Status.SUCCEEDED, inpaint
    assert inpaint["outputs"][0]["sha256"] != img2img["outputs"][0]["sha256"]
    # the record keeps references to the stored inputs; the manifest their hashes
    assert inpaint["request"]["mask"] == "sha256:" + hashlib.sha256(mask_png).hexdigest()
    manifest = json.loads(s3_get(stack, f"outputs/{inpaint['id']}/manifest.json"))
    assert manifest["mask_sha256"] == hashlib.sha256(mask_png).hexdigest()
    assert "mask" not in manifest["request"]

    pipe = StableDiffusionXLInpaintPipeline.from_pipe(bare_pipe)
    bare = bare_run(
        pipe,
        5,
        prompt="a garden",
        num_inference_steps=4,
        guidance_scale=5.0,
        image=Image.new("RGB", (64, 64), (200, 30, 30)),
        mask_image=mask_image(),
        strength=0.75,
        width=64,
        height=64,
    )
    worker_img = Image.open(io.BytesIO(s3_get(stack, inpaint["outputs"][0]["key"])))
    assert pixels(worker_img) == pixels(bare)


def test_mask_by_url_of_another_size_fails_at_the_worker(
    stack: Stack, http_dir: tuple[Path, int]
) -> None:
    root, port = http_dir
    mask_image((96, 96)).save(root / "mask96.png")
    mask_image((64, 64)).save(root / "mask64.png")
    req: dict[str, Any] = {"prompt": "a lake", "steps": 2, "image": data_uri(png((0, 0, 255)))}
    bad, _ = run_job(stack, **req, mask=f"http://127.0.0.1:{port}/mask96.png")
    assert bad["status"] == Status.FAILED
    assert bad["error"]["code"] == "image_invalid"
    assert bad["error"]["message"].startswith("mask: is 96×96 but image is 64×64")
    missing, _ = run_job(stack, **req, mask=f"http://127.0.0.1:{port}/missing.png")
    assert missing["error"]["code"] == "image_fetch_failed"
    assert missing["error"]["message"].startswith("mask: ")
    good, _ = run_job(stack, **req, mask=f"http://127.0.0.1:{port}/mask64.png")
    assert good["status"] == Status.SUCCEEDED, good
