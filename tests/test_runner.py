"""The job logic without Celery: a Lifecycle running Generation in this process, real Redis,
local storage."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.core.contract import EventType, Status, new_record, now_iso
from producer.core.registry import Registry
from producer.core.settings import Settings
from producer.core.storage import LocalStorage
from producer.jobs.store import JobStore
from producer.requests.generate import validate_request
from tests.helpers import wait_until
from tests.servers import RedisServer


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> Any:
    from worker.diffusion.pipelines import load_model

    return load_model(Registry.load()["tiny-sdxl"], Settings(models_dir=str(models_dir)), "cpu")


#: A database no other test file uses.
DB = 6


@pytest.fixture
def runner(redis_server: RedisServer, tiny: Any, tmp_path: Path) -> Iterator[Any]:
    from worker.generation import Generation
    from worker.lifecycle import Lifecycle

    # A database of this module's own: these jobs have no message, and the shared stack's
    # reconciler (on database 0) would re-publish one for a job queued past its grace
    # while an earlier job of this module runs, and a stack worker would then run it too.
    redis_url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    settings = Settings(redis_url=redis_url, default_model="tiny-sdxl", progress_interval_s=0.05)
    store = JobStore.from_url(redis_url)
    store.redis.flushdb()
    generation = Generation(settings, {"tiny-sdxl": tiny}, store, LocalStorage(tmp_path / "out"))
    yield Lifecycle(settings, store, "test:1", [generation])
    store.redis.close()


def work(runner: Any) -> Any:
    """The runner's generation work (which holds the storage)."""
    return runner.works["generate"]


def create(runner: Any, **request: Any) -> str:
    req = validate_request({"prompt": "p", **request}, Registry.load(), runner.settings)
    job_id = f"job{time.monotonic_ns()}"
    assert runner.store.create(new_record(job_id, req, now_iso())).ok
    return job_id


def types(store: JobStore, job_id: str) -> list[str]:
    return [e["type"] for e in store.events(job_id)]


def run_in_background(
    runner: Any, job_id: str, until_step: int
) -> tuple[threading.Thread, list[Any]]:
    """Run the job in a thread; return once its progress reaches ``until_step``."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(runner.run(job_id)))
    thread.start()
    wait_until(
        lambda: runner.store.get(job_id)["progress"]["step"] >= until_step,
        30,
        interval=0.02,
        message=f"job {job_id} reaches step {until_step}",
    )
    return thread, result


def test_runs_a_job_without_celery(runner: Any) -> None:
    job_id = create(runner, seed=1, steps=2, num_images=2, output_format="webp")
    assert runner.run(job_id) is Status.SUCCEEDED
    record = runner.store.get(job_id)
    assert [o["key"] for o in record["outputs"]] == [f"{job_id}/0.webp", f"{job_id}/1.webp"]
    assert record["outputs"][0]["content_type"] == "image/webp"
    manifest = json.loads(work(runner).storage.get(f"{job_id}/manifest.json"))
    assert manifest["seeds"] == [1, 2] and manifest["worker"] == "test:1"
    # a second delivery of a finished job does nothing
    before = (record, types(runner.store, job_id))
    assert runner.run(job_id) is None
    assert (runner.store.get(job_id), types(runner.store, job_id)) == before


def test_a_run_that_lost_its_job_writes_nothing(runner: Any) -> None:
    """Another run took the job over (its message was redelivered): this one stops at
    its next step and leaves no outcome, no output and no event behind."""
    job_id = create(runner, steps=150)
    thread, result = run_in_background(runner, job_id, until_step=2)
    snap = runner.store.load(job_id)
    taken = runner.store.apply(
        job_id,
        allowed="running",
        token=snap.token,
        record=dict(snap.record, worker="other:2"),
        new_token="other-run",
    )
    assert taken.ok
    n_events = len(types(runner.store, job_id))
    thread.join(30)
    assert result == [None]
    record = runner.store.get(job_id)
    assert record["status"] == Status.RUNNING and record["worker"] == "other:2"
    assert record["outputs"] == []
    assert len(types(runner.store, job_id)) == n_events
    assert not (Path(work(runner).storage.root) / job_id).exists()


def test_cancel_flag_seen_before_start(runner: Any) -> None:
    job_id = create(runner, steps=2)
    # a cancel that arrived while a crashed run held the job
    snap = runner.store.load(job_id)
    runner.store.apply(
        job_id,
        allowed="queued",
        token=snap.token,
        record=dict(snap.record, status="running", attempts=1),
        new_token="dead",
    )
    runner.store.request_cancel(job_id)
    assert runner.run(job_id) is None
    assert runner.store.get(job_id)["status"] == Status.CANCELLED
    assert types(runner.store, job_id)[-1] == EventType.CANCELLED


def test_invalid_inline_image_is_image_invalid(runner: Any) -> None:
    job_id = create(runner, steps=2)
    snap = runner.store.load(job_id)
    doc = dict(
        snap.record, request=dict(snap.record["request"], image="sha256:" + "0" * 64, strength=0.5)
    )
    runner.store.apply(job_id, allowed="queued", token=snap.token, record=doc)
    assert runner.run(job_id) is Status.FAILED
    error = runner.store.get(job_id)["error"]
    assert error["code"] == "image_invalid" and "no longer stored" in error["message"]


def test_waits_for_a_record_written_after_the_message(runner: Any) -> None:
    """The producer sends first and writes the record second: the worker waits."""
    req = validate_request({"prompt": "p", "steps": 1}, Registry.load(), runner.settings)
    job_id = f"late{time.monotonic_ns()}"
    writer = threading.Timer(0.5, lambda: runner.store.create(new_record(job_id, req, now_iso())))
    writer.start()
    try:
        assert runner.run(job_id) is Status.SUCCEEDED
    finally:
        writer.join()


def test_a_redelivered_job_counts_the_attempt_and_drops_stale_outputs(runner: Any) -> None:
    job_id = create(runner, steps=1)
    snap = runner.store.load(job_id)
    stale = {"index": 0, "key": "stale", "sha256": "0" * 64}
    runner.store.apply(
        job_id,
        allowed="queued",
        token=snap.token,
        new_token="dead-run",
        record=dict(snap.record, status="running", attempts=1, outputs=[stale]),
    )
    assert runner.run(job_id) is Status.SUCCEEDED
    record = runner.store.get(job_id)
    assert record["attempts"] == 2
    assert [o["key"] for o in record["outputs"]] == [f"{job_id}/0.png"]
    events = runner.store.events(job_id)
    retrying = [e for e in events if e["type"] == EventType.RETRYING]
    assert [e["data"]["attempt"] for e in retrying] == [2]


class TakeOverOnFirstPut:
    """Local storage whose first put lets another run take the job over."""

    def __init__(self, inner: LocalStorage, store: JobStore, job_id: str) -> None:
        self.inner, self.store, self.job_id = inner, store, job_id
        self.puts: list[str] = []

    def key(self, job_id: str, name: str) -> str:
        return self.inner.key(job_id, name)

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if not self.puts:
            snap = self.store.load(self.job_id)
            assert self.store.apply(
                self.job_id,
                allowed="running",
                token=snap.token,
                record=snap.record,
                new_token="winner",
            ).ok
        self.puts.append(key)
        self.inner.put(key, data, content_type)


def test_a_run_taken_over_during_upload_writes_no_more_objects(runner: Any) -> None:
    job_id = create(runner, steps=1, num_images=3)
    storage = TakeOverOnFirstPut(work(runner).storage, runner.store, job_id)
    work(runner).storage = storage
    assert runner.run(job_id) is None
    assert storage.puts == [f"{job_id}/0.png"]  # not 1.png, 2.png, nor the manifest
    record = runner.store.get(job_id)
    assert record["status"] == Status.RUNNING and record["outputs"] == []


def test_cancel_flag_alone_stops_a_running_job(runner: Any) -> None:
    """A cancel whose wake-up item an earlier run consumed still stops the job."""
    job_id = create(runner, steps=150)
    thread, result = run_in_background(runner, job_id, until_step=1)
    runner.store.redis.hset(f"atelier:job:{job_id}", "cancel", "1")  # no list item
    thread.join(30)
    assert result == [Status.CANCELLED]


def test_one_monitor_thread_serves_every_job(runner: Any) -> None:
    """Progress comes from one long-lived monitor thread, not a thread per job, and no
    progress event of a job lands after its generation ended."""
    before = sum(t.name == "atelier-monitor" for t in threading.enumerate())
    ids = [create(runner, seed=i, steps=12) for i in range(3)]
    for job_id in ids:
        assert runner.run(job_id) is Status.SUCCEEDED
    assert sum(t.name == "atelier-monitor" for t in threading.enumerate()) == before + 1
    for job_id in ids:
        seen = types(runner.store, job_id)
        first_output = seen.index(EventType.OUTPUT)
        assert EventType.PROGRESS not in seen[first_output:], seen
        # ~0.5 s of denoising, progress every 0.05 s: the monitor moved on to each job
        assert EventType.PROGRESS in seen[:first_output], seen


def test_delivery_fields_do_not_change_the_png_bytes(runner: Any) -> None:
    """The PNG's ``atelier`` chunk records the generation parameters only: the same
    picture asked for with other delivery fields is the same file."""
    same = {"seed": 7, "steps": 2}
    first = create(runner, **same)
    second = create(
        runner,
        **same,
        webhook_events=["started", "completed"],
        priority=9,
        timeout_s=120,
        expires_in_s=3600,
        metadata={"user": "u1"},
    )
    assert runner.run(first) is runner.run(second) is Status.SUCCEEDED
    a, b = (work(runner).storage.get(f"{j}/0.png") for j in (first, second))
    assert a == b
    import io

    from PIL import Image

    from tests.helpers import png_text

    chunk = json.loads(png_text(Image.open(io.BytesIO(a)))["atelier"])
    assert chunk["seed"] == 7 and chunk["request"]["steps"] == 2
    assert not {
        "webhook_events",
        "priority",
        "timeout_s",
        "expires_in_s",
        "metadata",
        "output_format",
        "quality",
    } & set(chunk["request"])


def test_the_lifecycle_knows_nothing_of_images() -> None:
    # A second kind of job (training) uses it unchanged: no diffusers, PIL or torch.
    import subprocess
    import sys

    code = (
        "import sys, worker.lifecycle, worker.run; "
        "print(sorted(m for m in ('torch', 'diffusers', 'PIL', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
