"""SD 1.5, SDXL-turbo and FLUX.1-schnell on their tiny variants, all in one worker."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.core.contract import Status
from tests.helpers import (
    BUCKET,
    Stack,
    bare_run,
    data_uri,
    mask_image,
    pixels,
    png,
    run_job,
    s3_get,
    stack_values,
    worker_env,
)
from tests.servers import RedisServer, S3Server, Worker

pytestmark = pytest.mark.slow
MODELS = ["tiny-sd15", "tiny-sdxl-turbo", "tiny-flux"]


@pytest.fixture(scope="module")
def families(
    session_dir: Path,
    redis_server: RedisServer,
    s3_server: S3Server,
    models_dir: Path,
    models_file: str,
) -> Iterator[Stack]:
    """One worker process preloading three models, consuming their three queues."""
    values = stack_values(
        redis_server.url, models_dir, models_file, f"s3://{BUCKET}/outputs", s3_server.endpoint
    )
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


def assert_previews(events: list[dict[str, Any]], size: tuple[int, int]) -> None:
    previews = [
        e["data"]["preview"]
        for e in events
        if e["type"] == "job.progress" and "preview" in e["data"]
    ]
    assert previews, [(e["type"], e["ts"], sorted(e["data"])) for e in events]
    for uri in previews:
        raw = base64.b64decode(uri.removeprefix("data:image/webp;base64,"))
        assert Image.open(io.BytesIO(raw), formats=["WEBP"]).size == size


def test_flux_equals_bare_diffusers(families: Stack, models_dir: Path) -> None:
    from diffusers import FluxPipeline

    # With previews on: made from the packed 16-channel latents, they change nothing.
    record, events = run_job(
        families,
        prompt="a tin robot",
        model="tiny-flux",
        seed=8,
        width=80,
        height=64,
        steps=96,
        preview=True,
    )
    pipe = FluxPipeline.from_pretrained(str(models_dir / "tiny-flux"), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    bare = bare_run(
        pipe,
        8,
        prompt="a tin robot",
        num_inference_steps=96,
        guidance_scale=0.0,
        width=80,
        height=64,
    )
    assert px(families, record) == pixels(bare)
    assert_previews(events, (80, 64))


def test_sd15_equals_bare_diffusers_and_reads_weights(families: Stack, models_dir: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    # Enough steps for progress events, with previews on: they change nothing.
    plain, events = run_job(
        families, prompt="a red fox", model="tiny-sd15", seed=4, steps=32, preview=True
    )
    weighted, _ = run_job(families, prompt="a (red:1.4) fox", model="tiny-sd15", seed=4, steps=32)
    long_a, _ = run_job(families, prompt="fox " * 25 + "red", model="tiny-sd15", seed=4)
    long_b, _ = run_job(families, prompt="fox " * 25 + "blue", model="tiny-sd15", seed=4)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(models_dir / "tiny-sd15"), use_safetensors=True
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True
    )
    pipe.set_progress_bar_config(disable=True)
    bare = bare_run(
        pipe, 4, prompt="a red fox", num_inference_steps=32, guidance_scale=7.5, width=64, height=64
    )
    assert px(families, plain) == pixels(bare)
    assert_previews(events, (64, 64))
    assert px(families, weighted) != px(families, plain)
    assert px(families, long_a) != px(families, long_b)  # the part after 75 tokens counts


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd15"])
def test_img2img_and_inpaint(families: Stack, model: str) -> None:
    req: dict[str, Any] = {
        "prompt": "a lake",
        "model": model,
        "seed": 2,
        "image": data_uri(png((0, 0, 200))),
    }
    img2img, _ = run_job(families, **req, strength=0.75)
    inpaint, _ = run_job(families, **req, strength=0.75, mask=data_uri(mask_image()))
    assert img2img["progress"] == {"step": 3, "total": 3}  # 4 steps × 0.75
    assert px(families, img2img) != px(families, inpaint)
    for r in (img2img, inpaint):  # the requested size, not the pipeline's default
        assert (r["outputs"][0]["width"], r["outputs"][0]["height"]) == (64, 64)
        assert Image.open(io.BytesIO(s3_get(families, r["outputs"][0]["key"]))).size == (64, 64)


@pytest.mark.parametrize(("model", "family"), [("tiny-sd15", "sd15"), ("tiny-flux", "flux")])
def test_lora_on_other_families(
    families: Stack, models_dir: Path, tmp_path: Path, model: str, family: str
) -> None:
    import boto3

    from worker.builtin.tiny import build_tiny_lora

    path = build_tiny_lora(tmp_path / f"{family}.safetensors", models_dir / model, family=family)
    s3 = boto3.client("s3", endpoint_url=families.settings.s3_endpoint_url)
    s3.put_object(Bucket=BUCKET, Key=f"adapters/{family}.safetensors", Body=path.read_bytes())
    req: dict[str, Any] = {"prompt": "a tin robot", "model": model, "seed": 5}
    before, _ = run_job(families, **req)
    styled, _ = run_job(
        families, **req, loras=[{"name": f"storage:adapters/{family}.safetensors", "scale": 1.0}]
    )
    after, _ = run_job(families, **req)
    assert px(families, styled) != px(families, before)
    assert px(families, after) == px(families, before)
    # an SDXL adapter does not fit this family: refused by name, nothing left behind
    sdxl = build_tiny_lora(tmp_path / "sdxl.safetensors", models_dir / "tiny-sdxl")
    s3.put_object(Bucket=BUCKET, Key="adapters/sdxl.safetensors", Body=sdxl.read_bytes())
    wrong, _ = run_job(families, **req, loras=[{"name": "storage:adapters/sdxl.safetensors"}])
    assert wrong["status"] == Status.FAILED and wrong["error"]["code"] == "invalid_request"
    assert wrong["error"]["message"].startswith("loras.0.name: ")
    assert px(families, run_job(families, **req)[0]) == px(families, before)


def test_flux_sweep(families: Stack) -> None:
    record, _ = run_job(
        families, prompt="a tin robot", model="tiny-flux", sweep={"steps": [1, 2], "seeds": [1, 2]}
    )
    assert record["status"] == Status.SUCCEEDED, record
    assert len(record["outputs"]) == 5 and record["outputs"][4]["contact_sheet"]
    assert record["progress"] == {"step": 6, "total": 6}


def test_flux_reference_jobs_and_the_base_bytes_after(
    families: Stack, models_dir: Path, tmp_path: Path
) -> None:
    import boto3

    from worker.builtin.tiny import build_tiny_lora

    req: dict[str, Any] = {"prompt": "a tin robot", "model": "tiny-flux", "seed": 6}
    ref = {"image": data_uri(png((30, 160, 90))), "scale": 1.0}
    before, _ = run_job(families, **req)
    referenced, _ = run_job(families, **req, references=[ref])
    two, _ = run_job(
        families, **req, references=[ref, {"image": data_uri(mask_image()), "scale": 0.5}]
    )
    after, _ = run_job(families, **req)
    assert len({px(families, r) for r in (before, referenced, two)}) == 3
    assert after["outputs"][0]["sha256"] == before["outputs"][0]["sha256"]
    assert [r["mode"] for r in two["request"]["references"]] == ["full", "full"]
    # with a LoRA, and as a sweep's cell: the job of its values
    path = build_tiny_lora(
        tmp_path / "flux-ref.safetensors", models_dir / "tiny-flux", family="flux"
    )
    s3 = boto3.client("s3", endpoint_url=families.settings.s3_endpoint_url)
    s3.put_object(Bucket=BUCKET, Key="adapters/flux-ref.safetensors", Body=path.read_bytes())
    lora = [{"name": "storage:adapters/flux-ref.safetensors", "scale": 1.0}]
    styled, _ = run_job(families, **req, references=[ref], loras=lora)
    swept, _ = run_job(
        families,
        prompt=req["prompt"],
        model="tiny-flux",
        references=[ref],
        loras=lora,
        sweep={"seeds": [6, 7]},
    )
    assert px(families, styled) not in {px(families, referenced), px(families, before)}
    assert px(families, swept, 0) == px(families, styled)
    assert run_job(families, **req)[0]["outputs"][0]["sha256"] == before["outputs"][0]["sha256"]


def test_flux_control_with_img2img_and_inpainting(families: Stack) -> None:
    # Flux's ControlNet img2img and inpainting pipelines take no negative_prompt at all
    req: dict[str, Any] = {
        "prompt": "a lake",
        "model": "tiny-flux",
        "seed": 2,
        "image": data_uri(png((0, 0, 200))),
        "strength": 0.75,
        "control": [{"name": "tiny-flux-canny", "image": data_uri(mask_image())}],
    }
    img2img, _ = run_job(families, **req)
    inpaint, _ = run_job(families, **req, mask=data_uri(mask_image()))
    plain, _ = run_job(families, **{k: v for k, v in req.items() if k != "control"})
    assert len({px(families, r) for r in (img2img, inpaint, plain)}) == 3
