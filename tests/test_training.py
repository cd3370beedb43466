"""Trainings (DreamBooth LoRA), on tiny-sdxl at 64 px: submitted, run by a real
``--train`` worker on its already-loaded base, which is restored exactly. The refusals
at submit are in test_training_refusals.py.

One module worker (private Redis, file storage) serves the cases that need one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from PIL import Image

from producer import Client
from producer.core.contract import EventType, Status
from producer.core.errors import InvalidRequest
from producer.core.settings import Settings
from tests.helpers import stack_values, worker_env
from tests.servers import RedisServer, Worker
from tests.training_inputs import PHOTOS, PROMPT, SUBJECT, zip_uri

# -- a real --train worker ---------------------------------------------------------------


@dataclass
class Rig:
    client: Client
    worker: Worker
    env: dict[str, str]
    tmp: Path

    def train_worker(self, name: str) -> Worker:
        return Worker(self.env, self.tmp / f"{name}.log", ["tiny-sdxl"], extra_args=["--train"])


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, models_file: str
) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("training")
    redis = RedisServer(tmp / "redis").start()
    values = stack_values(
        redis.url,
        models_dir,
        models_file,
        f"file://{tmp / 'out'}",
        job_timeout_s=120,
        progress_interval_s=0.05,
    )
    env = worker_env(values)
    worker = Worker(env, tmp / "worker.log", ["tiny-sdxl", "tiny-sdxl-edm"], extra_args=["--train"])
    try:
        worker.start()
        client = Client(Settings(**values))
        yield Rig(client, worker, env, tmp)
        client.close()
    finally:
        worker.stop()
        redis.stop()


def generate(client: Client, **extra: Any) -> str:
    job = client.submit(prompt="a dog on a beach", model="tiny-sdxl", seed=7, steps=3, **extra)
    record = client.wait(job, timeout=60)
    assert record["status"] == Status.SUCCEEDED, record["error"]
    return str(record["outputs"][0]["sha256"])


def distance(client: Client, storage: str, loras: list[dict[str, Any]]) -> float:
    """Mean over seeds 0-2 of the squared distance of PROMPT's picture to the nearest
    instance image (as cropped for training)."""
    import numpy as np

    from worker.training.inputs import decode

    crops = [
        np.asarray(i.image, dtype=np.float32)
        for i in decode(
            cast(Any, {"resolution": 64, "instance_prompt": PROMPT}),
            [(str(i), p) for i, p in enumerate(PHOTOS)],
        )
    ]
    request: dict[str, Any] = {
        "prompt": PROMPT,
        "model": "tiny-sdxl",
        "seed": 0,
        "num_images": 3,
        "steps": 4,
    }
    job = client.submit({**request, "loras": loras} if loras else request)
    record = client.wait(job, timeout=60)
    assert record["status"] == Status.SUCCEEDED, record["error"]
    out = []
    for o in record["outputs"]:
        img = np.asarray(Image.open(Path(storage) / str(o["key"])).convert("RGB"), dtype=np.float32)
        out.append(min(float(((img - c) ** 2).mean()) for c in crops))
    return sum(out) / len(out)


@pytest.mark.slow
def test_training_runs_and_the_base_is_restored(rig: Rig) -> None:
    client = rig.client
    before = generate(client)
    job = client.train(
        images=SUBJECT,
        instance_prompt=PROMPT,
        model="tiny-sdxl",
        steps=40,
        learning_rate=1e-2,
        resolution=64,
        seed=3,
        num_validation_images=1,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=4,
        train_text_encoder=True,
    )
    events = list(client.events(job, timeout=120))
    record = events[-1]["data"]["job"]
    assert record["status"] == Status.SUCCEEDED, record["error"]
    assert record["kind"] == "train" and record["progress"] == {"step": 40, "total": 40}
    progress = [e["data"] for e in events if e["type"] == EventType.PROGRESS]
    assert progress and {"step", "total", "phase", "loss", "lr"} <= set(progress[0])
    assert {p["phase"] for p in progress} <= {"training", "validation"}
    # Warmup: the rate climbs to learning_rate over the first 4 steps.
    early = [p for p in progress if p["phase"] == "training" and p["step"] < 4]
    assert all(p["lr"] < 1e-2 for p in early)
    [image, adapter] = record["outputs"]
    assert image["key"].endswith("/0.png") and image["width"] == 64
    assert adapter["adapter"] and adapter["key"].endswith(f"{job}/adapter.safetensors")

    storage = client.settings.storage_url.removeprefix("file://")
    from safetensors.torch import load

    state = load((Path(storage) / adapter["key"]).read_bytes())
    assert all(".lora" in k for k in state)
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    manifest = json.loads((Path(storage) / job / "manifest.json").read_text())
    assert len(manifest["loss"]) == 40 and len(manifest["training_images_sha256"]) == 2
    # The toy subject is learnt: the loss's moving average falls.
    loss = manifest["loss"]
    assert sum(loss[-10:]) < sum(loss[:10])
    assert manifest["hyperparameters"]["rank"] == 4 and manifest["model"]["weights"]
    # The base is the base again: the same generation gives the same bytes.
    assert generate(client) == before
    # The adapter, by the training's id, moves the same seeds' pictures toward the
    # subject; and it is off again after.
    lora = [{"name": f"job:{job}", "scale": 1.0}]
    assert distance(client, storage, lora) < distance(client, storage, [])
    assert generate(client) == before
    with pytest.raises(InvalidRequest) as info:
        client.submit(prompt="x", model="tiny-sdxl", loras=[{"name": "job:" + "0" * 32}])
    assert info.value.fields[0]["field"] == "loras.0.name"


@pytest.mark.slow
def test_an_edm_model_trains_the_edm_way(rig: Rig) -> None:
    """tiny-sdxl-edm (Playground v2.5's EDM scheduler config and VAE latent statistics)."""
    import math

    client = rig.client
    record = client.wait(
        client.train(
            images=SUBJECT,
            instance_prompt=PROMPT,
            steps=6,
            model="tiny-sdxl-edm",
            resolution=64,
            seed=2,
            num_validation_images=1,
        ),
        timeout=120,
    )
    assert record["status"] == Status.SUCCEEDED, record["error"]
    storage = Path(client.settings.storage_url.removeprefix("file://"))
    manifest = json.loads((storage / record["id"] / "manifest.json").read_text())
    assert manifest["edm"] is True and len(manifest["loss"]) == 6
    assert all(math.isfinite(v) for v in manifest["loss"])


@pytest.mark.slow
def test_a_zip_and_storage_keys_as_images(rig: Rig) -> None:
    """A zip given inline is read by the worker in memory (dot files and folders left
    out); ``storage:`` keys are read from the bucket."""
    client = rig.client
    zipped = zip_uri({"dog/b.png": PHOTOS[1], "dog/a.png": PHOTOS[0], "dog/.DS_Store": b"x"})
    storage = Path(client.settings.storage_url.removeprefix("file://"))
    (storage / "uploads").mkdir(parents=True, exist_ok=True)
    (storage / "uploads" / "a.png").write_bytes(PHOTOS[0])
    common: dict[str, Any] = {
        "instance_prompt": PROMPT,
        "steps": 2,
        "model": "tiny-sdxl",
        "resolution": 64,
        "num_validation_images": 0,
    }
    from_zip = client.wait(client.train(images=[zipped], **common), timeout=60)
    stored = client.wait(client.train(images=["storage:uploads/a.png"], **common), timeout=60)
    missing = client.wait(client.train(images=["storage:uploads/none.png"], **common), timeout=60)
    assert from_zip["status"] == stored["status"] == Status.SUCCEEDED
    import hashlib

    manifest = json.loads((storage / from_zip["id"] / "manifest.json").read_text())
    assert manifest["training_images_sha256"] == [hashlib.sha256(p).hexdigest() for p in PHOTOS]
    assert missing["status"] == Status.FAILED
    assert missing["error"] and missing["error"]["code"] == "image_fetch_failed"
    assert "images.0" in missing["error"]["message"]


@pytest.mark.slow
def test_cancel_mid_training(rig: Rig) -> None:
    client = rig.client
    job = client.train(
        images=SUBJECT[:1],
        instance_prompt=PROMPT,
        model="tiny-sdxl",
        steps=2000,
        resolution=64,
        seed=1,
    )
    for ev in client.events(job, timeout=60):
        if ev["type"] == EventType.PROGRESS and ev["data"]["step"] >= 2:
            client.cancel(job)
            break
    record = client.wait(job, timeout=30)
    assert record["status"] == Status.CANCELLED
    assert record["progress"]["step"] < 100
    with pytest.raises(InvalidRequest) as info:  # no adapter to use
        client.submit(prompt="x", model="tiny-sdxl", loras=[{"name": f"job:{job}"}])
    assert "cancelled" in info.value.fields[0]["message"]


def train_over_http(http: httpx.Client, owner: dict[str, str]) -> dict[str, Any]:
    """POST /v1/trainings: a refusal by field, then a training that is queued on the train
    queue, its events streamed to the end; the accepted job."""
    bad = http.post(
        "/v1/trainings",
        headers=owner,
        json={"images": [], "instance_prompt": PROMPT, "prior_preservation": True},
    )
    assert bad.status_code == 422
    assert {f["field"] for f in bad.json()["error"]["fields"]} == {"images", "class_prompt"}
    res = http.post(
        "/v1/trainings",
        headers=owner,
        json={
            "images": SUBJECT,
            "instance_prompt": PROMPT,
            "steps": 6,
            "resolution": 64,
            "num_validation_images": 0,
            "model": "tiny-sdxl",
        },
    )
    assert res.status_code == 202, res.text
    job: dict[str, Any] = res.json()
    assert job["kind"] == "train" and res.headers["Location"] == f"/v1/jobs/{job['id']}"
    queues = http.get("/v1/queues", headers=owner).json()["queues"]
    assert {
        "model": "tiny-sdxl",
        "kind": "train",
        "queue": "atelier.train.tiny-sdxl",
    }.items() <= next(
        q for q in queues if q["kind"] == "train" and q["model"] == "tiny-sdxl"
    ).items()
    with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=owner) as stream:
        body = "".join(stream.iter_text())
    assert "event: job.succeeded" in body and '"phase":"training"' in body
    return job


def generate_with_the_adapter(
    http: httpx.Client, owner: dict[str, str], other: dict[str, str], training: str
) -> None:
    """A generation with the training's adapter: refused for another key, made for its
    owner."""
    use = {
        "prompt": "a photo of sks dog",
        "model": "tiny-sdxl",
        "steps": 2,
        "loras": [{"name": f"job:{training}", "scale": 0.8}],
    }
    refused = http.post("/v1/jobs", headers=other, json=use)
    assert refused.status_code == 422
    assert refused.json()["error"]["fields"][0]["field"] == "loras.0.name"
    made = http.post("/v1/jobs", headers=owner, json=use)
    assert made.status_code == 202, made.text
    gen = made.json()["id"]
    with http.stream("GET", f"/v1/jobs/{gen}/events", headers=owner) as stream:
        assert "event: job.succeeded" in "".join(stream.iter_text())


@pytest.mark.slow
def test_training_through_the_api_then_a_generation_with_its_adapter(rig: Rig) -> None:
    from tests.servers import api_process

    env = {**rig.env, "ATELIER_API_KEYS": "owner-key,other-key"}
    api = api_process(env, rig.tmp / "api.log")
    api.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{api.port}", timeout=60) as http:
            owner = {"Authorization": "Bearer owner-key"}
            other = {"Authorization": "Bearer other-key"}
            job = train_over_http(http, owner)
            generate_with_the_adapter(http, owner, other, job["id"])
    finally:
        api.stop()


@pytest.mark.slow
def test_cli_trains_from_a_folder_and_downloads_the_adapter(rig: Rig) -> None:
    import subprocess
    import sys

    photos, out = rig.tmp / "photos", rig.tmp / "cli-out"
    photos.mkdir()
    for i, raw in enumerate(PHOTOS):
        (photos / f"{i}.png").write_bytes(raw)
    (photos / "notes.txt").write_text("not an image: left out")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "train",
            "--images",
            str(photos),
            "--prompt",
            PROMPT,
            "--model",
            "tiny-sdxl",
            "--steps",
            "3",
            "--resolution",
            "64",
            "--num-validation-images",
            "1",
            "--wait",
            "--out",
            str(out),
            "--json",
        ],
        env=rig.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(res.stdout)
    assert record["kind"] == "train" and len(record["request"]["images"]) == 2
    names = sorted(p.name.split("-", 1)[1] for p in out.iterdir())
    assert names == ["0.png", "adapter.safetensors"]


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(rig: Rig) -> None:
    """Killed mid-way (SIGKILL), resumed by another worker from the newest checkpoint:
    the adapter's bytes equal an uninterrupted run's. Last in the module: it kills the
    module's worker."""
    client = rig.client
    req = {
        "images": SUBJECT,
        "instance_prompt": PROMPT,
        "model": "tiny-sdxl",
        "steps": 16,
        "checkpoint_every": 4,
        "resolution": 64,
        "seed": 11,
        "num_validation_images": 0,
        "learning_rate": 1e-3,
        "prior_preservation": True,
        "class_prompt": "a photo of dog",
        "num_class_images": 2,
    }
    job = client.train(req)
    for ev in client.events(job, timeout=120):
        if ev["type"] == EventType.CHECKPOINT and ev["data"]["step"] >= 8:
            assert ev["data"]["key"].endswith(
                f"{job}/checkpoints/{ev['data']['step']:08d}/state.json"
            )
            rig.worker.kill()
            break
    second = rig.train_worker("second").start()
    try:
        record = client.wait(job, timeout=180)
        assert record["status"] == Status.SUCCEEDED, record["error"]
        assert record["attempts"] == 2 and record["resumed_from_step"] >= 8
        ref = client.wait(client.train(req), timeout=120)
        assert ref["status"] == Status.SUCCEEDED and "resumed_from_step" not in ref
    finally:
        second.stop()
    [resumed] = [o for o in record["outputs"] if o.get("adapter")]
    [uninterrupted] = [o for o in ref["outputs"] if o.get("adapter")]
    assert resumed["sha256"] == uninterrupted["sha256"]
    # Class images: made once by the first attempt, read back by the resumed one.
    out = Path(client.settings.storage_url.removeprefix("file://"))
    made = json.loads((out / job / "manifest.json").read_text())["class_images"]
    assert made == {"made": 0, "reused": 2}
    assert json.loads((out / ref["id"] / "manifest.json").read_text())["class_images"] == {
        "made": 2,
        "reused": 0,
    }
    assert sorted(p.name for p in (out / job / "class_images").iterdir()) == ["0.png", "1.png"]
    # The two newest checkpoints are kept, the older ones pruned.
    root = Path(client.settings.storage_url.removeprefix("file://")) / job / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if any(p.iterdir())) == ["00000008", "00000012"]
