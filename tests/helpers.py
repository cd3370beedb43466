"""What the tests share besides fixtures: polling, the shared stack's settings, and the
fault-injection suite's rig (``tests/faults``).

Fixtures live in the conftest modules and build on these; test modules import from
here, never from a conftest module (pytest imports those itself).
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
from PIL import Image, PngImagePlugin

from producer import Client
from producer.core import keys as K
from producer.core.contract import TERMINAL_EVENTS, Event, EventType, Record, Status
from producer.core.settings import Settings
from tests.servers import AWS_ENV, Process, RedisServer, Worker, api_process, dispatcher_process

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.05,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value, and
    return that value. After ``timeout`` seconds, raise AssertionError saying what was
    awaited (``message``, or a callable building it then, for details read at the time)
    and the last value seen. An exception from ``predicate`` propagates at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if message is None:
        what = getattr(predicate, "__qualname__", repr(predicate))
    else:
        what = message() if callable(message) else message
    last = "" if value is None or value is False else f" (last value: {value!r})"
    raise AssertionError(f"not true after {timeout} s: {what}{last}")


# -- the shared stack (tests/conftest.py) -------------------------------------------

BUCKET = "atelier-test"

# An extra registry entry no worker serves: its jobs stay queued (cancel, expiry).
MODELS_TOML = """
[models."tiny-idle"]
pipeline = "sdxl"
source = "builtin:tiny-sdxl"
dtype = "fp32"
scheduler = "euler"
schedulers = ["euler", "ddim"]
steps = 4
guidance_scale = 5.0
width = 64
height = 64
max_side = 512
max_pixels = 262144
"""


def generation_queues(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``/v1/queues`` rows of generation queues, by model (trainings' rows left out)."""
    return {q["model"]: q for q in rows if q["kind"] == "generate"}


def settings_env(**values: Any) -> dict[str, str]:
    """Settings as ATELIER_* environment variables (for subprocesses)."""
    return {f"ATELIER_{k.upper()}": str(v) for k, v in values.items() if v is not None}


class Stack:
    """Redis + S3 + one tiny-sdxl worker, and the settings that reach them."""

    def __init__(self, values: dict[str, Any], worker: Worker | None) -> None:
        self.values = values
        self.settings = Settings(**values)
        self.worker = worker

    def client(self) -> Any:
        return Client(self.settings)


def stack_values(
    redis_url: str,
    models_dir: Path,
    models_file: str,
    storage_url: str,
    s3_endpoint: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "storage_url": storage_url,
        "s3_endpoint_url": s3_endpoint,
        "models_dir": str(models_dir),
        "models_file": models_file,
        "default_model": "tiny-sdxl",
        "device": "cpu",
        "torch_threads": 1,
        "job_timeout_s": 60,
        "max_attempts": 2,
        "progress_interval_s": 0.1,
        "preview_interval_s": 0.1,
        "storage_retry_s": 5,
        "restore_interval_s": 1,
        "allow_http": "true",
        "egress_allowlist": "127.0.0.1",
    }
    values.update(extra)
    return values


def worker_env(values: dict[str, Any]) -> dict[str, str]:
    env = {**os.environ, **AWS_ENV, **settings_env(**values)}
    env["OMP_NUM_THREADS"] = "1"
    return env


# -- the fault-injection suite (tests/faults) ---------------------------------------

#: The webhook signing key of the suite's dispatchers.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"atelier-fault-webhook-secret-32b").decode()

#: Simulated GPUs (worker/builtin/simulated.py): the worker's real code path, no weights, so
#: a worker starts in seconds and a job's length is set by ``gpu_ms``.
MODELS = """
[models."sim"]
pipeline = "simulated"
source = "builtin:simulated"
gpu_ms = 150
steps = 4
width = 64
height = 64
max_side = 512
max_pixels = 262144

[models."sim-fast"]
pipeline = "simulated"
source = "builtin:simulated"
gpu_ms = 20
steps = 2
width = 64
height = 64
max_side = 512
max_pixels = 262144

[models."sim-mid"]
pipeline = "simulated"
source = "builtin:simulated"
gpu_ms = 1000
steps = 20
width = 64
height = 64
max_side = 512
max_pixels = 262144

[models."sim-slow"]
pipeline = "simulated"
source = "builtin:simulated"
gpu_ms = 3000
steps = 30
width = 64
height = 64
max_side = 512
max_pixels = 262144
"""


class Rig:
    """One test's servers and processes: a private redis-server, and the workers, API
    replicas and dispatchers the test starts, all stopped by :meth:`close`."""

    def __init__(self, tmp: Path, redis: RedisServer, models_dir: Path) -> None:
        self.tmp = tmp
        self.redis = redis
        self.out = tmp / "out"
        models_file = tmp / "models.toml"
        models_file.write_text(MODELS)
        self.base = stack_values(
            redis.url,
            models_dir,
            str(models_file),
            f"file://{self.out}",
            default_model="sim",
            max_attempts=3,
            rate_limit_per_s=0,
            api_keys="fault-key",
        )
        self.procs: list[Process] = []
        self._clients: list[Client] = []
        self._n = 0

    def values(self, **extra: Any) -> dict[str, Any]:
        return {**self.base, **extra}

    def settings(self, **extra: Any) -> Settings:
        return Settings(**self.values(**extra))

    def client(self, **extra: Any) -> Client:
        client = Client(self.settings(**extra))
        self._clients.append(client)
        return client

    def _redis(self) -> Any:
        """A client's Redis connection. Its replies are bytes (decode_responses is off),
        which redis-py's annotations, written for both modes, cannot say: hence Any."""
        return self._clients[0].store.redis if self._clients else self.client().store.redis

    def _log(self, kind: str) -> Path:
        self._n += 1
        return self.tmp / "logs" / f"{self._n:02d}-{kind}.log"

    def worker(
        self,
        models: list[str] | None = None,
        *,
        wait: bool = True,
        concurrency: int | None = None,
        new_session: bool = False,
        **extra: Any,
    ) -> Worker:
        w = Worker(
            worker_env(self.values(**extra)),
            self._log("worker"),
            models or ["sim"],
            concurrency=concurrency,
            new_session=new_session,
        )
        self.procs.append(w)
        w.start(wait=wait)
        return w

    def dispatcher(self, **extra: Any) -> Process:
        d = dispatcher_process(worker_env(self.values(**extra)), self._log("dispatcher"))
        self.procs.append(d)
        return d.start()

    def api(self, **extra: Any) -> Process:
        a = api_process(worker_env(self.values(**extra)), self._log("api"))
        self.procs.append(a)
        return a.start()

    def close(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - a client of a stopped Redis
                pass
        for p in reversed(self.procs):
            p.stop()

    # -- what the suite checks ------------------------------------------------------

    def events(self) -> list[Event]:
        """The whole global event stream (every event of every job of this test)."""
        from producer.jobs.eventlog import decode_event

        return [decode_event(eid, f) for eid, f in self._redis().xrange(K.GLOBAL_EVENTS)]

    def terminal_counts(self) -> Counter[str]:
        return Counter(
            e["job_id"] for e in self.events() if EventType(e["type"]) in TERMINAL_EVENTS
        )

    def wait_terminal(
        self, client: Client, job_ids: list[str], timeout: float
    ) -> dict[str, Record]:
        """Every job's record once all are terminal; fails naming those that are not."""
        pending = set(job_ids)
        records: dict[str, Record] = {}

        def all_terminal() -> bool:
            for jid in list(pending):
                doc = client.get(jid)
                if Status(doc["status"]).is_terminal():
                    records[jid] = doc
                    pending.discard(jid)
            return not pending

        def not_terminal() -> str:
            states = Counter(client.get(j)["status"] for j in pending)
            return (
                f"every job terminal; {len(pending)} are not: {dict(states)}; "
                f"e.g. {sorted(pending)[:3]}"
            )

        wait_until(all_terminal, timeout, interval=0.1, message=not_terminal)
        return records

    def leased_to(self, worker: Worker) -> list[str]:
        """The jobs whose lease names ``worker`` (running, or waiting for its GPU)."""
        r = self._redis()
        jobs = [j.decode() for j in r.zrange(K.LEASES, 0, -1)]
        holders = [r.hget(K.job_key(j), "lease") for j in jobs]
        return [
            j
            for j, h in zip(jobs, holders, strict=True)
            if h is not None and h.decode().endswith(f":{worker.pid}")
        ]

    def worker_of(self, doc: Record, workers: list[Worker]) -> Worker:
        """The worker process a record names (``host:pid``)."""
        pid = int(str(doc["worker"]).rsplit(":", 1)[1])
        [w] = [w for w in workers if w.proc is not None and w.proc.pid == pid]
        return w


def wait_for_event(
    client: Client, job_id: str, etype: EventType, timeout: float = 60, after: str | None = None
) -> Event:
    """The job's first event of type ``etype`` (after event id ``after``)."""
    for ev in client.events(job_id, after=after, timeout=timeout):
        if ev["type"] == etype:
            return ev
    raise AssertionError(f"job {job_id} ended before {etype}")


def assert_one_outcome(rig: Rig, client: Client, job_id: str) -> list[Event]:
    """One terminal event, last in the job's log, carrying the record as it stands."""
    log = client.store.events(job_id, count=10_000)
    terminal = [e for e in log if EventType(e["type"]) in TERMINAL_EVENTS]
    assert len(terminal) == 1, [e["type"] for e in log]
    assert log[-1] is terminal[0], [e["type"] for e in log]
    # The record has not changed since its terminal transition wrote it.
    assert terminal[0]["data"]["job"] == client.get(job_id)
    return log


def finished_after(doc: Record, instant: float) -> float:
    """Seconds from ``instant`` (``time.time()``) to the job's end."""
    from producer.core.contract import parse_iso

    return parse_iso(str(doc["finished_at"])).timestamp() - instant


def stored_files(root: Path, job_id: str) -> list[str]:
    """Every file under a job's output folder (temporary ones included)."""
    folder = root / job_id
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def manifest(root: Path, job_id: str) -> dict[str, Any]:
    return dict(json.loads((root / job_id / "manifest.json").read_text()))


# -- images and jobs of the generation tests -------------------------------------------


def s3_get(stack: Stack, key: str) -> bytes:
    s3 = boto3.client("s3", endpoint_url=stack.settings.s3_endpoint_url)
    body: bytes = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return body


def run_job(
    stack: Stack, timeout: float = 60, **request: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with stack.client() as client:
        job_id = client.submit(request)
        events = list(client.events(job_id, timeout=timeout))
        return client.get(job_id), events


def bare_run(pipe: Any, seed: int, **kwargs: Any) -> Image.Image:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker runs with ATELIER_TORCH_THREADS=1
    try:
        with torch.inference_mode():
            return pipe(generator=[torch.Generator("cpu").manual_seed(seed)], **kwargs).images[0]
    finally:
        torch.set_num_threads(threads)


def png_text(img: Image.Image) -> dict[str, str]:
    """A PNG's text chunks (``PngImageFile.text``, which reads the file for them)."""
    assert isinstance(img, PngImagePlugin.PngImageFile), type(img)
    return img.text


def pixels(img: Image.Image) -> bytes:
    return img.convert("RGB").tobytes()


def mask_image(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """White (repaint) on the left half, black (keep) on the right."""
    img = Image.new("L", size, 0)
    img.paste(255, (0, 0, size[0] // 2, size[1]))
    return img


def png(
    image: Image.Image | tuple[int, ...] = (200, 30, 60),
    size: tuple[int, int] = (64, 64),
    *,
    mode: str = "RGB",
    fmt: str = "PNG",
) -> bytes:
    """The one way the tests make an image file: ``image`` encoded (as PNG unless ``fmt``
    names another format), or, given a colour, a ``size`` picture of it in ``mode``."""
    img = image if isinstance(image, Image.Image) else Image.new(mode, size, image)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def data_uri(raw: bytes | Image.Image, mime: str = "image/png") -> str:
    """``raw`` as a ``data:`` URI (an image is encoded by :func:`png` first)."""
    body = png(raw) if isinstance(raw, Image.Image) else raw
    return f"data:{mime};base64,{base64.b64encode(body).decode()}"
