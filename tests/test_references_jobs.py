"""Control and reference jobs through the shared worker subprocess (tiny-sdxl) and the
HTTP API: composed with img2img, inpainting, LoRAs and sweeps; the job after one of them
has the base bytes; a control image that cannot be fetched fails naming its field."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from producer.core.contract import Status
from tests.helpers import (
    Stack,
    data_uri,
    mask_image,
    pixels,
    png,
    run_job,
    s3_get,
    wait_until,
)
from tests.servers import api_process, free_port

pytestmark = pytest.mark.slow
P: dict[str, Any] = {"prompt": "a copper kettle", "seed": 21, "steps": 3}


def shape() -> str:
    img = Image.effect_noise((64, 64), 60).convert("RGB")
    img.paste((255, 255, 255), (16, 16, 48, 48))
    return data_uri(img)


CONTROL = {"name": "tiny-sdxl-canny", "image": shape(), "preprocess": "canny"}
REFERENCE = {"image": data_uri(png((30, 160, 90))), "mode": "style", "scale": 1.0}


def ok(record: dict[str, Any]) -> dict[str, Any]:
    assert record["status"] == Status.SUCCEEDED, record
    return record


def px(stack: Stack, record: dict[str, Any], i: int = 0) -> bytes:
    return pixels(Image.open(io.BytesIO(s3_get(stack, ok(record)["outputs"][i]["key"]))))


def test_control_and_reference_jobs_and_the_base_pixels_after(stack: Stack) -> None:
    before, _ = run_job(stack, **P)
    controlled, _ = run_job(stack, **P, control=[CONTROL])
    referenced, _ = run_job(stack, **P, references=[REFERENCE])
    both, _ = run_job(
        stack,
        **P,
        control=[
            CONTROL,
            {**CONTROL, "name": "tiny-sdxl-depth", "preprocess": "none", "scale": 0.5},
        ],
        references=[REFERENCE, {**REFERENCE, "mode": "subject"}],
    )
    after, _ = run_job(stack, **P)
    assert len({px(stack, r) for r in (before, controlled, referenced, both)}) == 4
    assert ok(after)["outputs"][0]["sha256"] == ok(before)["outputs"][0]["sha256"]
    manifest = s3_get(stack, ok(both)["outputs"][0]["key"].rsplit("/", 1)[0] + "/manifest.json")
    assert b'"control_sha256"' in manifest and b'"references_sha256"' in manifest


def test_control_composes_with_img2img_inpainting_loras_and_sweeps(stack: Stack) -> None:
    init: dict[str, Any] = {"image": data_uri(png((0, 0, 200))), "strength": 0.75}
    img2img, _ = run_job(stack, **P, **init)
    controlled, _ = run_job(stack, **P, **init, control=[CONTROL])
    inpaint, _ = run_job(stack, **P, **init, mask=data_uri(mask_image()), control=[CONTROL])
    assert ok(controlled)["progress"]["total"] == 2  # 3 steps × 0.75
    assert len({px(stack, img2img), px(stack, controlled), px(stack, inpaint)}) == 3
    extra: dict[str, Any] = {
        "control": [CONTROL],
        "references": [REFERENCE],
        "loras": [{"name": "tiny-sdxl-lora", "scale": 1.0}],
    }
    single, _ = run_job(stack, **{**P, "seed": 5}, **extra)
    swept, _ = run_job(stack, prompt=P["prompt"], steps=3, sweep={"seeds": [5, 6]}, **extra)
    assert len(ok(swept)["outputs"]) == 3  # two cells and the contact sheet
    assert px(stack, swept, 0) == px(stack, single)  # a cell is the job of its values


def test_an_unreachable_control_image_fails_by_its_field(stack: Stack) -> None:
    url = f"http://127.0.0.1:{free_port()}/edges.png"  # nothing listens there
    record, _ = run_job(stack, **P, control=[{**CONTROL, "image": url}])
    assert record["status"] == Status.FAILED
    assert record["error"]["code"] == "image_fetch_failed"
    assert record["error"]["message"].startswith("control.0.image: ")


def test_through_the_api(stack: Stack, session_dir: Path) -> None:
    from tests.helpers import worker_env

    key = "key-refs-0123456789"
    env = worker_env({**stack.values, "api_keys": key, "rate_limit_per_s": 0})
    proc = api_process(env, session_dir / "logs" / "api-refs.log").start()
    auth = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{proc.port}", timeout=30) as api:
            bad = api.post(
                "/v1/jobs", headers=auth, json={**P, "control": [{**CONTROL, "scale": 3}]}
            )
            assert bad.status_code == 422, bad.text
            assert [f["field"] for f in bad.json()["error"]["fields"]] == ["control.0.scale"]
            ids = [
                api.post("/v1/jobs", headers=auth, json={**P, **body}).json()["id"]
                for body in ({"control": [CONTROL]}, {"references": [REFERENCE]})
            ]
            done: dict[str, Any] = {}

            def both_ended() -> bool:
                for job in ids:
                    doc = api.get(f"/v1/jobs/{job}", headers=auth).json()
                    if doc["status"] not in ("queued", "running"):
                        done[job] = doc
                return len(done) == 2

            wait_until(both_ended, 60, interval=0.2, message=lambda: f"{ids} end: {done}")
    finally:
        proc.stop()
    records = [done[j] for j in ids]
    assert [r["status"] for r in records] == ["succeeded", "succeeded"], records
    assert records[0]["request"]["control"][0]["preprocess"] == "canny"
    assert records[1]["request"]["references"][0]["mode"] == "style"


def test_previews_of_a_conditioned_job(stack: Stack) -> None:
    req: dict[str, Any] = {**P, "steps": 12, "control": [CONTROL], "references": [REFERENCE]}
    previewed, events = run_job(stack, **req, preview=True)
    plain, _ = run_job(stack, **req)
    previews = [e for e in events if e["type"] == "job.progress" and "preview" in e["data"]]
    assert previews, [e["data"] for e in events if e["type"] == "job.progress"]
    assert previews[0]["data"]["preview"].startswith("data:image/webp;base64,")
    assert px(stack, previewed) == px(stack, plain)  # previews change no pixel
