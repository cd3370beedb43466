"""End to end: producer → Redis → a real worker subprocess (tiny-sdxl, CPU) → moto S3."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.core.contract import EventType, Status
from tests.helpers import (
    Stack,
    bare_run,
    data_uri,
    generation_queues,
    pixels,
    png,
    png_text,
    run_job,
    s3_get,
    wait_until,
)

pytestmark = pytest.mark.slow


def test_events_outputs_and_manifest(stack: Stack) -> None:
    record, events = run_job(
        stack,
        prompt="a lighthouse at dusk",
        width=72,
        height=64,
        steps=6,
        seed=7,
        num_images=2,
        metadata={"user": "u1"},
    )
    assert record["status"] == Status.SUCCEEDED, record
    types = [e["type"] for e in events]
    # queued → started → progress… → output ×2 → succeeded, nothing else, in order
    assert types[:2] == [EventType.QUEUED, EventType.STARTED]
    assert types[-3:] == [EventType.OUTPUT, EventType.OUTPUT, EventType.SUCCEEDED]
    progress = [e["data"] for e in events if e["type"] == EventType.PROGRESS]
    assert progress and all(p["total"] == 6 for p in progress)
    assert [p["step"] for p in progress] == sorted({p["step"] for p in progress})
    assert types.count(EventType.SUCCEEDED) == 1
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)  # ordered ids
    assert all(e["data"].get("metadata") == {"user": "u1"} for e in events)
    assert events[-1]["data"]["job"]["outputs"] == record["outputs"]

    assert record["attempts"] == 1 and record["worker"]
    assert record["progress"] == {"step": 6, "total": 6}
    for name in ("queued_ms", "inference_ms", "encode_ms", "upload_ms", "total_ms"):
        assert record["timings"][name] >= 0, name
    assert record["timings"]["total_ms"] >= record["timings"]["inference_ms"]

    job_id = record["id"]
    assert [o["index"] for o in record["outputs"]] == [0, 1]
    for out in record["outputs"]:
        assert out["key"] == f"outputs/{job_id}/{out['index']}.png"
        assert out["seed"] == 7 + out["index"]
        data = s3_get(stack, out["key"])
        assert hashlib.sha256(data).hexdigest() == out["sha256"]
        assert len(data) == out["bytes"]
        img = Image.open(io.BytesIO(data))
        assert img.size == (72, 64) == (out["width"], out["height"])
        assert out["content_type"] == "image/png"
        assert "Seed: " + str(out["seed"]) in png_text(img)["parameters"]
        assert json.loads(png_text(img)["atelier"])["request"]["prompt"] == "a lighthouse at dusk"
        assert "X-Amz-Signature" in out["url"]  # presigned

    manifest = json.loads(s3_get(stack, f"outputs/{job_id}/manifest.json"))
    assert manifest["job_id"] == job_id
    assert manifest["seeds"] == [7, 8]
    assert manifest["request"]["prompt"] == "a lighthouse at dusk"
    assert manifest["model"]["name"] == "tiny-sdxl"
    assert manifest["model"]["source"] == "builtin:tiny-sdxl"
    weights = manifest["model"]["weights"]
    assert "unet/diffusion_pytorch_model.safetensors" in weights
    assert all(len(h) == 64 for h in weights.values())
    for lib in ("torch", "diffusers", "transformers", "python"):
        assert manifest["versions"][lib]
    assert [o["sha256"] for o in manifest["outputs"]] == [o["sha256"] for o in record["outputs"]]


def test_worker_warms_up_before_it_consumes(stack: Stack) -> None:
    assert stack.worker is not None
    log = stack.worker.log()
    assert log.index("warmed tiny-sdxl") < log.index("atelier worker ready")
    # The default ATELIER_GIL_SWITCH_INTERVAL_MS, applied in the worker process (not
    # Python's 5 ms, which makes the denoising thread wait on post-processing's GIL).
    assert "(GIL switch interval 0.5 ms)" in log


def test_worker_refuses_pickle(stack: Stack) -> None:
    """A message in any serializer but JSON is refused, never deserialized."""
    import pickle

    from kombu.connection import Connection

    from producer.jobs.broker import celery_config

    body = pickle.dumps(((), {}, {}))
    options = celery_config(stack.settings)["broker_transport_options"]
    with Connection(stack.settings.redis_url, transport_options=options) as conn:
        producer = conn.Producer()
        producer.publish(
            body,
            routing_key="atelier.tiny-sdxl",
            exchange="atelier.tiny-sdxl",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={
                "task": "atelier.generate",
                "id": "pickled-1",
                "argsrepr": "()",
                "kwargsrepr": "{}",
            },
        )
    assert stack.worker is not None
    worker = stack.worker
    wait_until(
        lambda: "Refusing to deserialize" in worker.log(),
        20,
        interval=0.1,
        message=lambda: f"the worker refuses the pickle:\n{worker.log()[-2000:]}",
    )
    # and the worker goes on serving
    record, _ = run_job(stack, prompt="after the pickle", steps=1)
    assert record["status"] == Status.SUCCEEDED


def test_same_seed_same_bytes_and_other_seed_differs(stack: Stack) -> None:
    a, _ = run_job(stack, prompt="a red fox", seed=123, steps=3)
    b, _ = run_job(stack, prompt="a red fox", seed=123, steps=3)
    c, _ = run_job(stack, prompt="a red fox", seed=124, steps=3)
    assert a["outputs"][0]["sha256"] == b["outputs"][0]["sha256"]
    assert a["outputs"][0]["sha256"] != c["outputs"][0]["sha256"]
    assert a["request"]["seed"] == 123


def test_drawn_seed_is_recorded_and_reproduces(stack: Stack) -> None:
    a, _ = run_job(stack, prompt="a blue owl", steps=3)
    seed = a["request"]["seed"]
    assert isinstance(seed, int)
    b, _ = run_job(stack, prompt="a blue owl", steps=3, seed=seed)
    assert a["outputs"][0]["sha256"] == b["outputs"][0]["sha256"]


def test_worker_bytes_equal_bare_diffusers(stack: Stack, bare_pipe: Any) -> None:
    """The queue adds and loses nothing: same pixels as diffusers alone."""
    req: dict[str, Any] = {
        "prompt": "a castle on a hill",
        "negative_prompt": "fog",
        "seed": 99,
        "steps": 5,
        "guidance_scale": 6.5,
        "width": 64,
        "height": 80,
    }
    record, _ = run_job(stack, **req)
    worker_img = Image.open(io.BytesIO(s3_get(stack, record["outputs"][0]["key"])))
    bare = bare_run(
        bare_pipe,
        99,
        prompt=req["prompt"],
        negative_prompt="fog",
        num_inference_steps=5,
        guidance_scale=6.5,
        width=64,
        height=80,
    )
    assert worker_img.size == bare.size == (64, 80)
    assert pixels(worker_img) == pixels(bare)


def test_img2img_data_uri(stack: Stack, bare_pipe: Any) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    red_png = png((255, 0, 0))
    red_uri = data_uri(red_png)
    txt, _ = run_job(stack, prompt="a garden", seed=5, steps=4)
    red, _ = run_job(stack, prompt="a garden", seed=5, steps=4, image=red_uri, strength=0.5)
    green, _ = run_job(
        stack,
        prompt="a garden",
        seed=5,
        steps=4,
        image=data_uri(png((0, 255, 0), (96, 96))),
        strength=0.5,
    )
    assert red["status"] == green["status"] == Status.SUCCEEDED
    assert red["request"]["strength"] == 0.5
    # the record keeps a reference, not megabytes of base64; the manifest the same hash
    assert red["request"]["image"] == "sha256:" + hashlib.sha256(red_png).hexdigest()
    manifest = json.loads(s3_get(stack, f"outputs/{red['id']}/manifest.json"))
    assert manifest["init_image_sha256"] == hashlib.sha256(red_png).hexdigest()
    # strength 0.5 of 4 steps denoises 2
    assert red["progress"] == {"step": 2, "total": 2}
    shas = {txt["outputs"][0]["sha256"], red["outputs"][0]["sha256"], green["outputs"][0]["sha256"]}
    assert len(shas) == 3  # the init image matters
    # the init image is resized to the requested size
    assert Image.open(io.BytesIO(s3_get(stack, green["outputs"][0]["key"]))).size == (64, 64)

    # and the pixels are exactly diffusers' img2img on the same weights
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(bare_pipe)
    bare = bare_run(
        img2img,
        5,
        prompt="a garden",
        num_inference_steps=4,
        guidance_scale=5.0,
        image=Image.new("RGB", (64, 64), (255, 0, 0)),
        strength=0.5,
    )
    worker_img = Image.open(io.BytesIO(s3_get(stack, red["outputs"][0]["key"])))
    assert pixels(worker_img) == pixels(bare)


def test_img2img_from_url_through_the_guard(stack: Stack, tmp_path: Any) -> None:
    import functools
    import http.server
    import threading

    (tmp_path / "init.png").write_bytes(png((0, 0, 255)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        ok, _ = run_job(stack, prompt="a lake", steps=2, image=f"http://127.0.0.1:{port}/init.png")
        assert ok["status"] == Status.SUCCEEDED, ok
        missing, _ = run_job(
            stack, prompt="a lake", steps=2, image=f"http://127.0.0.1:{port}/missing.png"
        )
        assert missing["status"] == Status.FAILED
        assert missing["error"]["code"] == "image_fetch_failed"
        # ::1 is loopback and not on the allowlist (127.0.0.1 is): a literal address is
        # refused at submit (names are checked by the worker's guard when fetched).
        from producer import InvalidRequest

        with pytest.raises(InvalidRequest) as info, stack.client() as client:
            client.submit(prompt="a lake", steps=2, image=f"http://[::1]:{port}/init.png")
        assert info.value.fields[0]["field"] == "image"
        assert "not a public address" in info.value.fields[0]["message"]
    finally:
        server.shutdown()
        thread.join(5)


def test_cancel_queued_job(stack: Stack) -> None:
    with stack.client() as client:
        job_id = client.submit(prompt="never runs", model="tiny-idle")
        assert client.get(job_id)["status"] == Status.QUEUED
        record = client.cancel(job_id)
        assert record["status"] == Status.CANCELLED
        types = [e["type"] for e in client.events(job_id, timeout=5)]
        assert types == [EventType.QUEUED, EventType.CANCELLED]
        # a terminal record never changes: cancelling again is a no-op
        assert client.cancel(job_id) == client.get(job_id)


def test_cancel_running_job_within_a_step(stack: Stack) -> None:
    with stack.client() as client:
        job_id = client.submit(prompt="a long one", steps=150)
        for ev in client.events(job_id, timeout=60):
            if ev["type"] == EventType.PROGRESS:
                break
        asked = time.monotonic()
        client.cancel(job_id)
        record = client.wait(job_id, timeout=30)
        took = time.monotonic() - asked
    assert record["status"] == Status.CANCELLED
    assert record["outputs"] == []
    assert record["progress"]["step"] < 150
    # One step of tiny-sdxl here is ~50 ms; the monitor wakes on the cancel at once.
    assert took < 2.0, took


def test_timeout(stack: Stack) -> None:
    record, events = run_job(stack, prompt="too slow", steps=150, timeout_s=1)
    assert record["status"] == Status.FAILED
    assert record["error"]["code"] == "timeout"
    assert events[-1]["type"] == EventType.FAILED
    assert events[-1]["data"]["error"]["code"] == "timeout"
    assert record["outputs"] == []


def test_expiry_while_queued(stack: Stack) -> None:
    with stack.client() as client:
        job_id = client.submit(prompt="too late", model="tiny-idle", expires_in_s=1)
        assert client.get(job_id)["status"] == Status.QUEUED
        time.sleep(1.2)
        record = client.get(job_id)
        assert record["status"] == Status.EXPIRED
        types = [e["type"] for e in client.events(job_id, timeout=5)]
        assert types == [EventType.QUEUED, EventType.EXPIRED]


def test_expiry_seen_by_the_worker(stack: Stack) -> None:
    """A job whose deadline passes behind busy slots is expired by the worker, not run."""
    with stack.client() as client:
        busy = [client.submit(prompt=f"busy {i}", steps=150) for i in range(2)]
        late = client.submit(prompt="late", steps=2, expires_in_s=1)
        time.sleep(1.5)
        for job_id in busy:
            client.cancel(job_id)
        # nobody read `late` meanwhile: the worker itself must find it expired
        record = client.wait(late, timeout=60)
        for job_id in busy:
            assert client.wait(job_id, timeout=60)["status"] == Status.CANCELLED
    assert record["status"] == Status.EXPIRED
    assert record["attempts"] == 0 and record["started_at"] is None


def test_priority_orders_the_queue(stack: Stack) -> None:
    """With the worker busy, a priority 9 job submitted last starts before priority 0 ones."""
    with stack.client() as client:
        busy = [client.submit(prompt=f"hold {i}", steps=40) for i in range(2)]
        low = [client.submit(prompt=f"low {i}", steps=1, priority=0) for i in range(2)]
        high = client.submit(prompt="high", steps=1, priority=9)
        records = {j: client.wait(j, timeout=90) for j in [*busy, *low, high]}
    assert all(r["status"] == Status.SUCCEEDED for r in records.values())
    assert records[high]["started_at"] < min(records[j]["started_at"] for j in low)


def test_cli_submit_wait_downloads_the_images(stack: Stack, tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    from tests.helpers import worker_env
    from tests.servers import ROOT

    env = worker_env(stack.values)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "submit",
            "a quiet harbour",
            "--steps",
            "2",
            "--seed",
            "11",
            "--num-images",
            "2",
            "--wait",
            "--out",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(res.stdout)
    assert record["status"] == Status.SUCCEEDED
    assert len(record["files"]) == 2
    for path, out in zip(record["files"], record["outputs"], strict=True):
        data = Path(path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == out["sha256"]
    assert os.path.basename(record["files"][1]) == f"{record['id']}-1.png"


def test_cli_queues_workers_and_status_read_the_fleet(stack: Stack) -> None:
    import subprocess
    import sys

    from tests.helpers import worker_env
    from tests.servers import ROOT

    env = worker_env(stack.values)

    def cli(*args: str) -> Any:
        res = subprocess.run(
            [sys.executable, "-m", "producer.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    with stack.client() as client:
        queued = client.submit(prompt="waits", model="tiny-idle")
        before = generation_queues(json.loads(cli("queues", "--json")))
        assert before["tiny-idle"]["queued"] >= 1 and before["tiny-idle"]["depth"] >= 1
        assert "tiny-idle" in cli("queues")
        client.cancel(queued)
        after = generation_queues(json.loads(cli("queues", "--json")))
        assert after["tiny-idle"]["queued"] == before["tiny-idle"]["queued"] - 1
        workers = json.loads(cli("workers", "--json"))
        mine = [w for w in workers if w["pid"] == stack.worker.proc.pid]  # type: ignore[union-attr]
        assert len(mine) == 1 and mine[0]["models"] == ["tiny-sdxl"]
        assert mine[0]["device"] == "cpu" and mine[0]["jobs_done"] >= 0
        status = json.loads(cli("status", queued, "--json"))
        assert status["status"] == "cancelled" and status["webhook_deliveries"] == []
        assert "job.cancelled" in cli("events", queued)
