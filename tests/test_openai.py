"""The OpenAI-compatible image routes, driven by OpenAI's own SDKs: the ``openai``
Python package, and the ``openai`` npm package through node (``tests/node``), against a
real uvicorn (``atelier api``) and the shared stack's tiny-sdxl worker."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from PIL import Image

from producer.api import create_app
from producer.core import keys as K
from producer.core.settings import Settings
from tests.helpers import Stack, png, wait_until, worker_env
from tests.servers import ROOT, Process, api_process

pytestmark = pytest.mark.slow

KEY, OTHER = "key-openai-0123456789", "key-openai-other-0123"
PROMPT = "a lighthouse at dusk"
NODE_DIR = ROOT / "tests" / "node"


def api_env(stack: Stack, **extra: Any) -> dict[str, str]:
    return worker_env(
        {
            **stack.values,
            "api_keys": f"{KEY},{OTHER}",
            "rate_limit_per_s": 0,
            "openai_model_aliases": "gpt-image-1=tiny-sdxl,dall-e-3=tiny-sdxl",
            "max_body_bytes": 262144,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def api_server_env(stack: Stack) -> dict[str, str]:
    return api_env(stack)


@pytest.fixture(scope="module")
def api(api_server: Process) -> Process:
    """The module's API process (tests/conftest.py: ``api_server``)."""
    return api_server


def sdk(proc: Process, key: str = KEY) -> openai.OpenAI:
    # No retries: a refusal is the answer under test, not something to ride out.
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{proc.port}/v1", api_key=key, max_retries=0, timeout=120
    )


def record(proc: Process, job_id: str, key: str = KEY) -> dict[str, Any]:
    res = httpx.get(
        f"http://127.0.0.1:{proc.port}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}
    )
    assert res.status_code == 200, res.text
    doc: dict[str, Any] = res.json()
    return doc


def job_count(stack: Stack) -> int:
    r = redis.Redis.from_url(stack.settings.redis_url)
    try:
        return sum(1 for _ in r.scan_iter(K.JOB + "*", count=1000))
    finally:
        r.close()


def test_an_alias_to_no_model_stops_the_api_at_start(models_file: str) -> None:
    for aliases, why in (
        ("gpt-image-1=playground-v9", "no model 'playground-v9'"),
        ("tiny-sdxl=playground-v2.5", "a model's own name"),
    ):
        with pytest.raises(ValueError, match="ATELIER_OPENAI_MODEL_ALIASES") as refused:
            create_app(Settings(models_file=models_file, openai_model_aliases=aliases))
        assert why in str(refused.value)
    with pytest.raises(ValueError, match="alias=model pairs"):
        Settings(openai_model_aliases="gpt-image-1")


def test_generate_b64_json_two_images_through_an_alias(api: Process) -> None:
    raw = sdk(api).images.with_raw_response.generate(
        model="gpt-image-1", prompt=PROMPT, n=2, size="64x64", quality="low"
    )
    result = raw.parse()
    job = record(api, raw.headers["x-atelier-job-id"])
    assert job["status"] == "succeeded"
    assert job["request"]["model"] == "tiny-sdxl" and job["request"]["num_images"] == 2
    # quality low: half the model's 4 default steps.
    assert job["request"]["steps"] == 2
    assert result.data is not None and len(result.data) == 2
    assert (result.output_format, result.size, result.quality) == ("png", "64x64", "low")
    for image, output in zip(result.data, job["outputs"], strict=True):
        assert image.url is None and image.b64_json is not None
        data = base64.b64decode(image.b64_json)
        assert hashlib.sha256(data).hexdigest() == output["sha256"]
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    # A job like any other: listed with the key's jobs.
    listed = httpx.get(
        f"http://127.0.0.1:{api.port}/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    assert job["id"] in {j["id"] for j in listed["data"]}
    # GET /v1/models keeps atelier's shape, and says what each alias runs.
    models = httpx.get(
        f"http://127.0.0.1:{api.port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    assert models["aliases"] == {"gpt-image-1": "tiny-sdxl", "dall-e-3": "tiny-sdxl"}
    assert "tiny-sdxl" in {m["name"] for m in models["models"]}


def test_generate_url_in_webp(api: Process) -> None:
    raw = sdk(api).images.with_raw_response.generate(
        model="tiny-sdxl",
        prompt=PROMPT,
        response_format="url",
        output_format="webp",
        output_compression=50,
        user="user-42",
    )
    result = raw.parse()
    job = record(api, raw.headers["x-atelier-job-id"])
    assert job["request"]["output_format"] == "webp" and job["request"]["quality"] == 50
    assert job["metadata"] == {"openai_user": "user-42"}
    assert result.safety_identifier == "user-42"
    assert result.data is not None and result.data[0].b64_json is None
    url = result.data[0].url
    assert url is not None
    body = httpx.get(url).content
    assert hashlib.sha256(body).hexdigest() == job["outputs"][0]["sha256"]
    assert Image.open(io.BytesIO(body)).format == "WEBP"


def test_edit_with_a_mask_inpaints_where_it_is_transparent(api: Process, stack: Stack) -> None:
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # the left half is repainted
    raw = sdk(api).images.with_raw_response.edit(
        model="dall-e-3",
        image=("in.png", png((200, 30, 30)), "image/png"),
        mask=("mask.png", png(mask), "image/png"),
        prompt="a blue sky",
        extra_body={"seed": 5},
    )
    result = raw.parse()
    job = record(api, raw.headers["x-atelier-job-id"])
    req = job["request"]
    assert job["status"] == "succeeded" and req["seed"] == 5 and req["strength"] == 1.0
    assert (req["width"], req["height"]) == (64, 64) and result.size == "64x64"
    # The mask the worker used is atelier's: white (repainted) where OpenAI's was clear.
    atelier_mask = Image.open(
        io.BytesIO(stack.client().store.get_input(req["mask"].removeprefix("sha256:")))
    )
    assert atelier_mask.getpixel((10, 10)) == 255 and atelier_mask.getpixel((50, 10)) == 0
    assert result.data is not None and result.data[0].b64_json is not None


def test_refusals_name_the_field_and_enqueue_nothing(api: Process, stack: Stack) -> None:
    client = sdk(api)
    before = job_count(stack)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="gpt-image-1", prompt=PROMPT, size="100x60")
    assert bad.value.param == "size" and "multiple of 8" in bad.value.message
    assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt=PROMPT, background="transparent")
    assert bad.value.param == "background"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt=PROMPT, extra_body={"cfg_rescale": 1})
    assert bad.value.param == "cfg_rescale" and bad.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(
            image=("a.png", png((1, 2, 3)), "image/png"),
            mask=("m.png", png((0, 0, 0)), "image/png"),
            prompt=PROMPT,
        )
    assert bad.value.param == "mask" and "alpha" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:  # the image guards
        client.images.edit(image=("a.png", b"GIF89a not a picture", "image/png"), prompt=PROMPT)
    assert bad.value.param == "image" and "PNG, JPEG or WEBP" in bad.value.message
    with pytest.raises(openai.APIStatusError) as big:  # MAX_BODY_BYTES, multipart too
        client.images.edit(image=("a.png", b"\0" * 300_000, "image/png"), prompt=PROMPT)
    assert big.value.status_code == 413 and big.value.code == "payload_too_large"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="gpt-image-9", prompt=PROMPT)
    assert missing.value.param == "model" and missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as denied:
        sdk(api, "not-a-key").images.generate(prompt=PROMPT)
    assert denied.value.code == "invalid_api_key"
    assert job_count(stack) == before


def test_a_client_that_leaves_finds_its_job_again(api: Process) -> None:
    """The job of a request whose client went away runs to the end; the same request
    with the same Idempotency-Key answers with that job's images."""
    url = f"http://127.0.0.1:{api.port}/v1/images/generations"
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "leave-1"}
    body = {"prompt": PROMPT, "size": "64x64", "steps": 40}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, headers=headers, timeout=httpx.Timeout(30, read=0.5))
    raw = sdk(api).images.with_raw_response.generate(
        prompt=PROMPT,
        size="64x64",
        extra_body={"steps": 40},
        extra_headers={"Idempotency-Key": "leave-1"},
    )
    assert raw.headers["idempotent-replayed"] == "true"
    job = record(api, raw.headers["x-atelier-job-id"])
    assert job["status"] == "succeeded" and job["request"]["steps"] == 40
    assert raw.parse().data is not None
    # The same key with another body is a conflict, and the SDK does not retry it.
    with pytest.raises(openai.ConflictError) as conflict:
        openai.OpenAI(base_url=f"http://127.0.0.1:{api.port}/v1", api_key=KEY).images.generate(
            prompt="another prompt", extra_headers={"Idempotency-Key": "leave-1"}
        )
    assert conflict.value.code == "idempotency_conflict"
    assert conflict.value.response.headers["x-should-retry"] == "false"
    # The API saw the first client go (its wait stopped: 499, nginx's "client closed").
    metrics = httpx.get(f"http://127.0.0.1:{api.port}/metrics").text
    assert (
        'atelier_api_requests_total{method="POST",route="/v1/images/generations",status="499"} 1.0'
    ) in metrics


def test_stream_sends_partial_images_from_previews_then_the_image(api: Process) -> None:
    stream = sdk(api).images.generate(
        prompt=PROMPT,
        size="64x64",
        stream=True,
        partial_images=2,
        output_format="jpeg",
        extra_body={"steps": 16},
    )
    job_id = stream.response.headers["x-atelier-job-id"]
    events = list(stream)
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert [e.type for e in events[-1:]] == ["image_generation.completed"]
    assert len(completed) == 1 and completed[0].output_format == "jpeg"
    # Previews, re-encoded as asked, at most partial_images of them, numbered from 0.
    assert 1 <= len(partial) <= 2, [e.type for e in events]
    assert [e.partial_image_index for e in partial] == list(range(len(partial)))
    for event in partial:
        picture = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
        assert picture.format == "JPEG" and max(picture.size) <= 64
    assert record(api, job_id)["request"]["preview"] is True
    data = base64.b64decode(completed[0].b64_json)
    assert hashlib.sha256(data).hexdigest() == record(api, job_id)["outputs"][0]["sha256"]
    # An edit streams image_edit.* events.
    edit = sdk(api).images.edit(
        image=("in.png", png((9, 90, 200)), "image/png"),
        prompt=PROMPT,
        stream=True,
        partial_images=1,
        extra_body={"steps": 24},
    )  # strength 0.6: 14 steps
    types = [e.type for e in edit]
    assert types[-1] == "image_edit.completed" and types.count("image_edit.partial_image") == 1


@pytest.fixture(scope="module")
def strict_api(stack: Stack, session_dir: Path) -> Iterator[Process]:
    """An API with a tight rate limit and a short wait: each case here is about one."""
    env = api_env(stack, rate_limit_per_s=0.2, rate_limit_burst=2, openai_wait_s=1.5)
    proc = api_process(env, session_dir / "logs" / "api-openai-strict.log").start()
    yield proc
    proc.stop()


def test_the_rate_limit_is_a_rate_limit_error_with_retry_after(strict_api: Process) -> None:
    client = sdk(strict_api)
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):  # charged, refused for its model
            client.images.generate(model="gpt-image-9", prompt=PROMPT)
    with pytest.raises(openai.RateLimitError) as limited:
        client.images.generate(model="gpt-image-1", prompt=PROMPT)
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_a_wait_past_openai_wait_s_names_the_job_and_is_not_retried(
    strict_api: Process, stack: Stack
) -> None:
    before = job_count(stack)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{strict_api.port}/v1", api_key=OTHER, max_retries=2
    )
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as late:
        client.images.generate(model="tiny-idle", prompt=PROMPT)  # no worker serves it
    assert late.value.status_code == 504 and late.value.code == "wait_timeout"
    assert time.monotonic() - t0 < 10  # one wait, no retry
    job_id = late.value.response.headers["x-atelier-job-id"]
    assert record(strict_api, job_id, OTHER)["status"] == "queued"
    assert job_count(stack) == before + 1
    httpx.post(
        f"http://127.0.0.1:{strict_api.port}/v1/jobs/{job_id}/cancel",
        headers={"Authorization": f"Bearer {OTHER}"},
    )


def test_the_node_sdk_generates_and_streams(api: Process) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the openai npm package cannot run")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail(
            "tests/node/node_modules is missing: run `npm ci` in tests/node (make test does)"
        )
    res = subprocess.run(
        [node, str(NODE_DIR / "images.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{api.port}/v1",
            "OPENAI_API_KEY": KEY,
        },
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    generated = base64.b64decode(out["generate"]["b64_json"])
    assert Image.open(io.BytesIO(generated)).size == (64, 64)
    job = record(api, out["generate"]["job_id"])
    assert hashlib.sha256(generated).hexdigest() == job["outputs"][0]["sha256"]
    assert out["stream"]["types"][-1] == "image_generation.completed"
    assert 1 <= out["stream"]["partials"] <= 2
    wait_until(lambda: record(api, out["stream"]["job_id"])["status"] == "succeeded", 10)


def test_the_docs_examples_run_as_they_stand(api: Process, tmp_path: Path) -> None:
    """docs/openai.md's calls, with only OPENAI_BASE_URL and OPENAI_API_KEY set."""
    page = (ROOT / "docs" / "openai.md").read_text()
    blocks = re.findall(r"<!-- checked -->\n```python\n(.*?)```", page, re.DOTALL)
    assert len(blocks) == 3
    (tmp_path / "sunlit_lounge.png").write_bytes(png((240, 220, 180)))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    env = {
        "PATH": "/usr/bin:/bin",
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{api.port}/v1",
    }
    for code in blocks:
        res = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    for name in ("otter.png", "composition.png"):
        assert Image.open(tmp_path / name).size == (64, 64)
