"""SD 1.5, SDXL-turbo and FLUX.1-schnell on their tiny variants, all in one worker."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.contract import Status
from tests.conftest import BUCKET, Stack, stack_values, worker_env
from tests.servers import RedisServer, S3Server, Worker
from tests.test_inpaint import data_uri, mask_image
from tests.test_jobs import bare_run, pixels, png_data_uri, run_job, s3_get

pytestmark = pytest.mark.slow
MODELS = ["tiny-sd15", "tiny-sdxl-turbo", "tiny-flux"]


@pytest.fixture(scope="module")
def families(session_dir: Path, redis_server: RedisServer, s3_server: S3Server,
             models_dir: Path, models_file: str) -> Iterator[Stack]:
    """One worker process preloading three models, consuming their three queues."""
    values = stack_values(redis_server.url, models_dir, models_file, f"s3://{BUCKET}/outputs",
                          s3_server.endpoint)
    worker = Worker(worker_env(values), session_dir / "logs" / "families.log", MODELS)
    worker.start()
    try:
        yield Stack(values, worker)
    finally:
        worker.stop()


def px(stack: Stack, record: dict[str, Any], i: int = 0) -> bytes:
    assert record["status"] == Status.SUCCEEDED, record
    return pixels(Image.open(io.BytesIO(s3_get(stack, record["outputs"][i]["key"]))))


def test_one_worker_serves_every_model_it_loaded(families: Stack) -> None:
    assert families.worker is not None
    log = families.worker.log()
    for name in MODELS:
        assert f"warmed {name}" in log
        assert f"atelier.{name}" in log  # its queue is consumed
    with families.client() as client:
        ids = {m: client.submit(prompt="a tin robot", model=m, seed=3) for m in MODELS}
        records = {m: client.wait(j, timeout=60) for m, j in ids.items()}
    workers = {r["worker"] for r in records.values()}
    assert len(workers) == 1  # the same process ran all three
    for m, r in records.items():
        assert r["status"] == Status.SUCCEEDED, r
        assert r["request"]["model"] == m
        assert (r["outputs"][0]["width"], r["outputs"][0]["height"]) == (64, 64)
    assert records["tiny-sdxl-turbo"]["request"]["steps"] == 1
    assert records["tiny-sdxl-turbo"]["request"]["guidance_scale"] == 0.0


def test_flux_equals_bare_diffusers(families: Stack, models_dir: Path) -> None:
    from diffusers import FluxPipeline

    record, _ = run_job(families, prompt="a tin robot", model="tiny-flux", seed=8, width=80,
                        height=64)
    pipe = FluxPipeline.from_pretrained(str(models_dir / "tiny-flux"), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    bare = bare_run(pipe, 8, prompt="a tin robot", num_inference_steps=4, guidance_scale=0.0,
                    width=80, height=64)
    assert px(families, record) == pixels(bare)


def test_sd15_equals_bare_diffusers_and_reads_weights(families: Stack, models_dir: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    plain, _ = run_job(families, prompt="a red fox", model="tiny-sd15", seed=4)
    weighted, _ = run_job(families, prompt="a (red:1.4) fox", model="tiny-sd15", seed=4)
    long_a, _ = run_job(families, prompt="fox " * 25 + "red", model="tiny-sd15", seed=4)
    long_b, _ = run_job(families, prompt="fox " * 25 + "blue", model="tiny-sd15", seed=4)
    pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / "tiny-sd15"),
                                                   use_safetensors=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                             use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    bare = bare_run(pipe, 4, prompt="a red fox", num_inference_steps=4, guidance_scale=7.5,
                    width=64, height=64)
    assert px(families, plain) == pixels(bare)
    assert px(families, weighted) != px(families, plain)
    assert px(families, long_a) != px(families, long_b)  # the part after 75 tokens counts


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd15"])
def test_img2img_and_inpaint(families: Stack, model: str) -> None:
    req = {"prompt": "a lake", "model": model, "seed": 2, "image": png_data_uri((0, 0, 200))}
    img2img, _ = run_job(families, **req, strength=0.75)
    inpaint, _ = run_job(families, **req, strength=0.75, mask=data_uri(mask_image()))
    assert img2img["progress"] == {"step": 3, "total": 3}  # 4 steps × 0.75
    assert px(families, img2img) != px(families, inpaint)
