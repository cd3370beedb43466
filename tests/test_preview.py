"""Live previews (docs/features.md, "Live previews"): the latent-to-RGB maps, the x0
hand-over from the scheduler, and the previews a tiny-sdxl job's progress events carry
(only there)."""

from __future__ import annotations

import base64
import inspect
import io
import json
import threading
from typing import Any

import pytest
import torch
from PIL import Image

from producer.core import keys as K
from tests.helpers import Stack, wait_until
from worker.diffusion.preview import FACTORS, Previewer, map_family, unpack, watch_scheduler

PREFIX = "data:image/webp;base64,"


def decode(uri: str) -> Image.Image:
    assert uri.startswith(PREFIX)
    image = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix(PREFIX))), formats=["WEBP"])
    image.load()
    return image


# -- the maps ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl", "playground-v2.5", "flux"])
def test_each_family_maps_its_channels_to_rgb(family: str) -> None:
    rows, bias = FACTORS[family]
    channels = len(rows)
    assert channels == (16 if family == "flux" else 4) and all(len(r) == 3 for r in rows)
    previewer = Previewer(family, 64, 64, 256)
    latents = torch.zeros(channels, 8, 8)
    latents[:, 2, 5] = torch.linspace(-1.0, 1.0, channels)  # one pixel set, the rest zero
    image = previewer.to_image(latents)
    assert image.size == (8 * 8, 8 * 8) and image.mode == "RGB"
    # Unscaled, the pixel is the published formula: (W·l + b + 1) / 2 in 0…255.
    raw = Previewer(family, 8, 8, 256).to_image(latents)
    for c in range(3):
        value = sum(rows[k][c] * float(latents[k, 2, 5]) for k in range(channels))
        value += bias[c] if bias else 0.0
        expected = min(255, max(0, int((value + 1.0) * 127.5)))
        assert abs(raw.getpixel((5, 2))[c] - expected) <= 1
        zero = min(255, max(0, int(((bias[c] if bias else 0.0) + 1.0) * 127.5)))
        assert raw.getpixel((0, 0))[c] == zero


def test_preview_size_keeps_the_aspect_and_the_cap() -> None:
    assert Previewer("sdxl", 1024, 768, 256).size == (256, 192)
    assert Previewer("sdxl", 64, 64, 256).size == (64, 64)  # never larger than the image
    assert Previewer("sdxl", 512, 2048, 128).size == (32, 128)


def test_flux_tokens_unpack_as_diffusers_packs_them() -> None:
    latents = torch.randn(2, 16, 12, 8)  # a 96 × 64 image
    # diffusers' FluxPipeline._pack_latents (importing the pipeline here costs seconds;
    # tests/test_families.py runs the real one through the worker).
    tokens = latents.view(2, 16, 6, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 6 * 4, 64)
    assert torch.equal(unpack(tokens, 96, 64), latents)
    assert unpack(tokens, 64, 64) is tokens  # another size: left alone, then refused


def test_a_map_refuses_latents_of_another_channel_count() -> None:
    previewer = Previewer("sdxl", 64, 64, 256)
    previewer.latest.put("x0", torch.randn(1, 16, 8, 8))
    assert previewer.render() is None
    previewer.latest.put("x0", torch.randn(1, 4, 8, 8))
    assert decode(previewer.render() or "").size == (64, 64)
    assert previewer.render() is None  # nothing new since


def test_playground_latents_get_their_own_map() -> None:
    from types import SimpleNamespace

    config = SimpleNamespace(latents_mean=[-1.6574, 1.886, -1.383, 2.5155])
    pipe = SimpleNamespace(vae=SimpleNamespace(config=config))
    assert map_family("sdxl", pipe) == "playground-v2.5"
    assert map_family("sdxl", object()) == "sdxl"
    assert map_family("flux", object()) == "flux" and map_family("simulated", None) is None


@pytest.mark.parametrize(
    "name", ["EulerAncestralDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"]
)
def test_the_watched_step_keeps_its_signature(name: str) -> None:
    import diffusers

    scheduler = getattr(diffusers, name)()
    before = inspect.signature(scheduler.step).parameters.keys()
    watch_scheduler(scheduler, Previewer("sdxl", 64, 64, 256).latest)
    # Pipelines read eta and generator from it.
    assert inspect.signature(scheduler.step).parameters.keys() == before


# -- through the worker -----------------------------------------------------------------


def watch_progress(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    """The record's ``progress`` as read while the job runs (as long as the events are
    followed)."""
    seen: list[dict[str, Any]] = []
    store = stack.client().store

    def ended() -> bool:
        record = store.get(job_id)
        seen.append(record["progress"])
        return record["status"] not in ("queued", "running")

    wait_until(ended, 60, interval=0.01, message=f"job {job_id} ends")
    return seen


@pytest.mark.slow
def test_progress_events_carry_previews_of_the_clean_image(stack: Stack) -> None:
    with stack.client() as client:
        job_id = client.submit(prompt="a lighthouse at dusk", steps=32, seed=5, preview=True)
        records: list[list[dict[str, Any]]] = []
        watcher = threading.Thread(target=lambda: records.append(watch_progress(stack, job_id)))
        watcher.start()
        events = list(client.events(job_id, timeout=60))
        watcher.join(timeout=30)
        plain = client.submit(prompt="a lighthouse at dusk", steps=32, seed=5)
        plain_events = list(client.events(plain, timeout=60))
    assert events[-1]["type"] == "job.succeeded"
    progress = [e for e in events if e["type"] == "job.progress"]
    previews = [e["data"]["preview"] for e in progress if "preview" in e["data"]]
    images = [decode(p) for p in previews]
    assert len(images) >= 2, progress
    assert {im.size for im in images} == {(64, 64)}
    assert len({im.convert("RGB").tobytes() for im in images}) >= 2  # it changes
    # The record stays small: the picture rides on the events only.
    assert records and all(set(p) == {"step", "total"} for p in records[0])
    # preview: false (the default) gives none; nor does the global stream, ever.
    assert not [e for e in plain_events if "preview" in e["data"]]
    assert [e["type"] for e in plain_events].count("job.progress") >= 1
    shared = [
        (i.decode(), f)
        for i, f in stack.client().store.redis.xrevrange(K.GLOBAL_EVENTS, count=2000)
        if f[b"job_id"].decode() == job_id
    ]
    shared_progress = {
        i: json.loads(f[b"data"]) for i, f in shared if f[b"type"] == b"job.progress"
    }
    assert set(shared_progress) == {e["id"] for e in progress}  # the same events…
    assert all("preview" not in d and "step" in d for d in shared_progress.values())  # …less it
