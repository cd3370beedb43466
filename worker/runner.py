"""Running one job: plain code the Celery task adapts (testable without Celery).

The steps of :meth:`Runner.run`:

1. Wait for the GPU (one generation at a time per device).
2. Start: compare-and-set the record to ``running`` with a fresh fence token, counting
   the attempt, or end it at once (cancelled, expired, or out of attempts).
3. Generate, with the worker's monitor thread beside the denoising loop: it publishes
   throttled progress and turns a cancel request into a flag. The step callback only reads
   flags and the clock: no I/O on the loop's critical path.
4. Release the GPU, so the next job generates while this one is post-processed
   (``ATELIER_OVERLAP_POSTPROCESS=false`` keeps it through 5-6: for comparison only).
5. Encode and upload every image, then the manifest.
6. Succeed: one compare-and-set that only this run's token can make.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from producer.contract import (
    CONTENT_TYPES,
    EXTENSIONS,
    EventType,
    Status,
    denoise_steps,
    now_iso,
    parse_iso,
    sweep_cells,
    terminal_event,
)
from producer.errors import (
    Fenced,
    GiveBack,
    ImageFetchFailed,
    ImageInvalid,
    InternalError,
    JobCancelled,
    JobError,
    JobTimeout,
    OutOfMemory,
    WorkerLost,
)
from producer.settings import Settings
from producer.storage import LocalStorage, S3Storage
from producer.store import JobStore, Snapshot, is_expired
from worker import encode as encoding
from worker.loras import LoraCache, apply_loras, unload_loras
from worker.metrics import WorkerMetrics
from worker.pipelines import GENERATOR_DEVICE, LoadedModel, library_versions
from worker.prompts import conditioning
from worker.safety import SafetyChecker, blur, placeholder

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One attempt at a job, owned by this process while ``token`` is the job's."""

    job_id: str
    token: str
    doc: dict[str, Any]
    deadline: float
    step: int = 0
    total: int = 0
    init_sha256: str | None = None
    mask_sha256: str | None = None
    init_size: tuple[int, int] | None = None  # the init image as given, before resizing
    flags: list[bool] | None = None  # the safety checker's verdicts, when it ran
    safety_action: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    fenced: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Set (under ``lock``) when the denoising loop has ended: no progress after it.
    generated: bool = False

    @property
    def request(self) -> dict[str, Any]:
        return self.doc["request"]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class Runner:
    def __init__(
        self,
        settings: Settings,
        models: dict[str, LoadedModel],
        store: JobStore,
        storage: LocalStorage | S3Storage,
        worker_name: str,
        loras: LoraCache | None = None,
        safety: SafetyChecker | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = store
        self.storage = storage
        self.worker_name = worker_name
        # One generation at a time per device; post-processing runs outside it.
        self.gpu = threading.Lock()
        self.versions = library_versions()
        # For the heartbeat: jobs held now, and messages handled since start.
        self._lock = threading.Lock()
        self.current: set[str] = set()
        self.jobs_done = 0
        self._loras = loras
        self.safety = safety
        self._monitor: Monitor | None = None
        self._monitor_lock = threading.Lock()
        self.metrics = metrics or WorkerMetrics()
        #: Set at warm shutdown (SIGTERM): jobs already running finish, a job still
        #: waiting for the GPU is given back rather than started.
        self.draining = threading.Event()

    def drain(self) -> None:
        """Start no more jobs: the ones waiting for the GPU go back to the queue."""
        self.draining.set()

    @property
    def loras(self) -> LoraCache:
        if self._loras is None:
            from producer.registry import Registry

            self._loras = LoraCache(self.settings, Registry.load(self.settings.models_file),
                                    self.storage)
        return self._loras

    @property
    def monitor(self) -> Monitor:
        """The process's one monitor thread, started on first use."""
        with self._monitor_lock:
            if self._monitor is None or not self._monitor.is_alive():
                self._monitor = Monitor(self)
                self._monitor.start()
            return self._monitor

    # -- 1-6 --------------------------------------------------------------------------

    def run(self, job_id: str, tag: str | None = None) -> Status | None:
        """Run a job to a terminal state; returns it (None when this run was fenced, the
        job had already ended, or another worker holds it).

        ``tag`` is the delivery tag of the message being handled: the job is leased to
        this worker for that message (see :meth:`JobStore.hold`) until it ends, and the
        heartbeat renews the lease meanwhile.
        """
        with self._lock:
            if job_id in self.current:
                # A second message for a job another slot holds (a backstop redelivery):
                # that slot runs it.
                log.warning("job %s: already held by this worker; duplicate message dropped",
                            job_id, extra={"job_id": job_id})
                return None
            self.current.add(job_id)
        tag = tag or f"direct-{secrets.token_hex(8)}"  # no broker message (tests)
        status: Status | None = None
        try:
            status = self._run(job_id, tag)
            return status
        finally:
            try:
                # Ended by this run: its terminal write cleared the lease. Given back,
                # dropped or fenced: let go, so nothing waits for the lease to run out.
                if status is None:
                    self.store.release(job_id, self.worker_name, tag)
            except redis.RedisError as exc:
                log.warning("job %s: lease not released (%s); it expires by itself", job_id,
                            exc, extra={"job_id": job_id})
            finally:
                with self._lock:
                    self.current.discard(job_id)
                    self.jobs_done += 1

    def activity(self) -> tuple[list[str], int]:
        """Jobs held now (the heartbeat renews their leases), and messages handled since
        start."""
        with self._lock:
            return sorted(self.current), self.jobs_done

    def _run(self, job_id: str, tag: str) -> Status | None:
        snap = self._hold(job_id, tag)
        if snap is None:
            return None  # no record, finished already, or another worker holds it
        # Fetch an init image before taking the GPU: a slow image server delays only
        # this job, while the other slot's job keeps the GPU busy.
        init_bytes: bytes | None = None
        mask_bytes: bytes | None = None
        init_error: JobError | None = None
        if snap.doc["request"].get("image"):
            try:
                init_bytes = self._fetch_init_image(snap.doc["request"]["image"])
                if snap.doc["request"].get("mask"):
                    mask_bytes = self._fetch_init_image(snap.doc["request"]["mask"], "mask")
            except JobError as exc:
                init_error = exc
        # An uncontended GPU right after the record was read: start from that read
        # (one round trip less; the start's compare-and-set still checks the token).
        fresh = init_bytes is None and init_error is None and self.gpu.acquire(blocking=False)
        if not fresh:
            self._wait_for_gpu(job_id)
        self.metrics.busy.begin()
        with _held(self.gpu, self.metrics.busy.end):
            if self.draining.is_set():
                # Shutting down with the GPU just freed: this job has not started, so
                # another worker runs it now rather than this one delaying its exit.
                raise GiveBack(job_id)
            run = self._start(job_id, snap if fresh else None)
            if run is None:
                return None
            if init_error is not None:
                return self._finish(run, Status.FAILED, error=init_error.to_error())
            t0 = time.perf_counter()
            try:
                images = self._generate(run, init_bytes, mask_bytes)
            except Fenced:
                log.warning("job %s: fenced during generation; another run owns it", job_id)
                return None
            except JobCancelled:
                return self._finish(run, Status.CANCELLED)
            except JobError as exc:
                return self._finish(run, Status.FAILED, error=exc.to_error())
            except redis.RedisError:
                raise  # the store is unreachable: the task requeues the message
            except Exception as exc:
                log.exception("job %s: generation failed", job_id)
                return self._finish(run, Status.FAILED, error=_internal(exc))
            inference_ms = _ms(time.perf_counter() - t0)
            if not self.settings.overlap_postprocess:
                # The naive worker: the GPU waits while this job is encoded and stored.
                return self._complete(run, images, inference_ms)
        return self._complete(run, images, inference_ms)

    def _wait_for_gpu(self, job_id: str) -> None:
        # A slot waits here while the other generates; at shutdown it stops waiting.
        while not self.gpu.acquire(timeout=0.05):
            if self.draining.is_set():
                raise GiveBack(job_id)

    def _complete(self, run: Run, images: list[Any], inference_ms: int) -> Status | None:
        """Steps 5-6, the other slot's job generating meanwhile."""
        try:
            return self._post_process(run, images, inference_ms)
        except Fenced:
            log.warning("job %s: fenced during upload; another run owns it", run.job_id)
            return None
        except JobError as exc:
            return self._finish(run, Status.FAILED, error=exc.to_error())
        except redis.RedisError:
            raise
        except Exception as exc:
            log.exception("job %s: post-processing failed", run.job_id)
            return self._finish(run, Status.FAILED, error=_internal(exc))

    def _hold(self, job_id: str, tag: str, grace_s: float = 5.0) -> Snapshot | None:
        """Lease the job to this worker and read it, in one round trip.

        The producer sends the message before it writes the record, so a worker can see
        the message a moment early; a message whose record never comes (the producer
        failed in between) is dropped. The record usually follows within a millisecond:
        poll fast, then back off.
        """
        deadline = time.monotonic() + grace_s
        pause = 0.001
        ttl_s = self.settings.lease_ttl_s
        while True:
            held = self.store.hold(job_id, self.worker_name, tag, ttl_s)
            if held.result == "ok":
                return held.snapshot
            if held.result == "held":
                log.warning("job %s: held by worker %s; duplicate message dropped", job_id,
                            held.holder, extra={"job_id": job_id})
                return None
            if held.result != "__missing__":
                return None  # a duplicate delivery of a finished job
            if time.monotonic() > deadline:
                log.warning("job %s has no record (never written, or expired): dropped",
                            job_id)
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _start(self, job_id: str, snap: Snapshot | None = None) -> Run | None:
        if snap is None:
            snap = self.store.load(job_id)  # again: it may have changed while we waited
        doc = snap.doc
        if snap.status.is_terminal():
            return None
        allowed = f"{Status.QUEUED.value},{Status.RUNNING.value}"
        if snap.cancel_requested:
            self._end_unstarted(job_id, snap, Status.CANCELLED, allowed)
            return None
        if snap.status is Status.QUEUED and is_expired(doc):
            if self.store.expire(job_id, snap).ok:
                self.metrics.job_ended(doc["request"]["model"], Status.EXPIRED.value,
                                       None, None)
            return None
        if snap.status is Status.RUNNING and doc["attempts"] >= self.settings.max_attempts:
            # Every earlier run died without a word: this job kills its worker.
            err = WorkerLost(
                f"the worker running this job was lost {doc['attempts']} times "
                f"(ATELIER_MAX_ATTEMPTS={self.settings.max_attempts})"
            )
            self._end_unstarted(job_id, snap, Status.FAILED, allowed, err.to_error())
            return None
        attempt = doc["attempts"] + 1
        token = secrets.token_hex(8)
        now = now_iso()
        new = dict(
            doc,
            status=Status.RUNNING.value,
            attempts=attempt,
            worker=self.worker_name,
            started_at=now,
            progress={"step": 0, "total": denoise_steps(doc["request"])},
            error=None,
            outputs=[],  # nothing of an earlier attempt carries over
            timings={},
        )
        events: list[tuple[EventType, dict[str, Any]]] = []
        if attempt > 1 and snap.announced < attempt:
            # The reconciler announces the retry when it takes a job back; a run that
            # ended otherwise (the store unreachable, the visibility timeout) is
            # announced here.
            events.append((EventType.RETRYING, {"attempt": attempt, "reason": "worker_lost"}))
        events.append((EventType.STARTED, {"attempt": attempt, "worker": self.worker_name}))
        out = self.store.apply(
            job_id, allowed=allowed, token=snap.token, doc=new, new_token=token, events=events,
            lease=f"held:{self.worker_name}",
        )
        if not out.ok:
            log.info("job %s: not started (%s)", job_id, out.detail)
            return None
        timeout_s = doc["request"].get("timeout_s") or self.settings.job_timeout_s
        return Run(job_id, token, new, time.monotonic() + timeout_s,
                   total=denoise_steps(doc["request"]))

    def _end_unstarted(
        self, job_id: str, snap: Snapshot, status: Status, allowed: str,
        error: dict[str, Any] | None = None,
    ) -> None:
        doc = dict(snap.doc, status=status.value, finished_at=now_iso(), error=error)
        out = self.store.apply(job_id, allowed=allowed, token=snap.token, doc=doc,
                               events=[terminal_event(doc)])
        if out.ok:
            self.metrics.job_ended(doc["request"]["model"], status.value, error, None)

    def _generate(self, run: Run, init_bytes: bytes | None,
                  mask_bytes: bytes | None = None) -> list[Any]:
        import torch

        req = run.request
        model = self.models.get(req["model"])
        if model is None:  # the queue name guarantees this; a broken deployment may not
            raise InternalError(f"this worker has not loaded model {req['model']!r}")
        init = self._init_image(run, init_bytes) if init_bytes is not None else None
        mask = None
        if init is not None and mask_bytes is not None:
            init, mask = self._mask_image(run, init, mask_bytes)
        pipe = model.pipe if init is None else model.img2img if mask is None else model.inpaint
        pipe.scheduler = model.scheduler(req["scheduler"])
        n = req["num_images"]
        gens = [torch.Generator(GENERATOR_DEVICE).manual_seed(req["seed"] + i)
                for i in range(n)]
        cells = sweep_cells(req)
        done = [0]  # steps of the sweep's cells already run

        def on_step_end(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            # Flags and the clock only: the monitor thread does the I/O.
            if not cells:
                run.total = getattr(p, "num_timesteps", run.total) or run.total
            run.step = done[0] + i + 1
            if run.fenced.is_set():
                raise Fenced(run.job_id)
            if run.cancel.is_set():
                raise JobCancelled(run.job_id)
            if time.monotonic() > run.deadline:
                raise JobTimeout(f"ran past timeout_s={req['timeout_s']}")
            return kwargs

        kwargs: dict[str, Any] = {
            "prompt": req["prompt"],
            "negative_prompt": req["negative_prompt"] or None,
            "num_inference_steps": req["steps"],
            "guidance_scale": req["guidance_scale"],
            "num_images_per_prompt": n,
            "generator": gens,
            "callback_on_step_end": on_step_end,
            "output_type": "pil",
        }
        if init is not None:
            kwargs.update(image=init, strength=req["strength"])
            if mask is not None:
                kwargs.update(mask_image=mask)
            if mask is not None or _takes_size(pipe):
                # (Flux's img2img would otherwise work at its default 1024², whatever the
                # image; SD img2img pipelines take the image's size and no such argument.)
                kwargs.update(width=req["width"], height=req["height"])
        else:
            kwargs.update(width=req["width"], height=req["height"])
        # Loaded into the shared modules for this job only; unloaded below, whatever
        # happens, before the GPU lock is released.
        adapters = apply_loras(model.pipe, self.loras, req["loras"]) if req.get("loras") else []
        monitor = self.monitor
        monitor.watch(run)
        try:
            with torch.inference_mode():
                # Long or weighted prompts become embeddings; plain ones stay text.
                cond = conditioning(model.spec.pipeline, model.pipe, req["prompt"],
                                    req["negative_prompt"])
                if cond is not None:
                    del kwargs["prompt"], kwargs["negative_prompt"]
                    kwargs.update(cond)
                if not cells:
                    images = list(pipe(**kwargs).images)
                else:
                    images = []
                    for cell in cells:
                        # Each cell exactly as a job of its own parameters would run.
                        pipe.scheduler = model.scheduler(req["scheduler"])
                        gen = torch.Generator(GENERATOR_DEVICE).manual_seed(cell["seed"])
                        images += pipe(**dict(
                            kwargs, num_inference_steps=cell["steps"], generator=[gen],
                            guidance_scale=cell["guidance_scale"], num_images_per_prompt=1,
                        )).images
                        done[0] += pipe.num_timesteps
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise OutOfMemory(f"out of GPU memory: {exc}") from None
        except MemoryError:
            raise OutOfMemory("out of host memory") from None
        finally:
            monitor.unwatch(run)
            if adapters:
                unload_loras(model.pipe, adapters)
        if time.monotonic() > run.deadline:  # the VAE decode ran past it
            raise JobTimeout(f"ran past timeout_s={req['timeout_s']}")
        action = model.spec.safety_action or self.settings.safety_action
        if self.safety is not None and action != "off":
            run.flags, run.safety_action = self.safety.check(images), action
        return images

    def _fetch_init_image(self, src: str, field_name: str = "image") -> bytes:
        from producer.netguard import EgressRefused, fetch

        if src.startswith("sha256:"):  # given inline; the client stored the bytes
            stored = self.store.get_input(src.removeprefix("sha256:"))
            if stored is None:
                raise ImageInvalid(f"{field_name}: the inline image is no longer stored")
            return stored
        try:
            return fetch(src, max_bytes=self.settings.max_image_bytes,
                         total_timeout=self.settings.image_fetch_timeout_s,
                         allowlist=self.settings.egress_allowlist,
                         allow_http=self.settings.allow_http)
        except (EgressRefused, OSError, ValueError) as exc:
            raise ImageFetchFailed(f"{field_name}: {exc}") from None

    def _init_image(self, run: Run, raw: bytes) -> Any:
        from PIL import Image

        from producer.images import open_image

        run.init_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            img = open_image(raw)
        except ValueError as exc:
            raise ImageInvalid(f"image {exc}") from None
        size = (run.request["width"], run.request["height"])
        run.init_size = img.size  # the mask is checked against it
        return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)

    def _mask_image(self, run: Run, init: Any, raw: bytes) -> tuple[Any, Any]:
        """The inpainting mask as greyscale at the output size; it must match the image
        as given (a mismatch means the two do not belong together)."""
        from PIL import Image

        from producer.images import open_image

        run.mask_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            mask = open_image(raw)
        except ValueError as exc:
            raise ImageInvalid(f"mask {exc}") from None
        source_size = run.init_size or init.size
        if mask.size != source_size:
            raise ImageInvalid(f"mask: is {mask.width}×{mask.height} but image is "
                               f"{source_size[0]}×{source_size[1]}; they must be the same size")
        size = (run.request["width"], run.request["height"])
        mask = mask.convert("L")
        return init, mask if mask.size == size else mask.resize(size, Image.Resampling.LANCZOS)

    def _post_process(self, run: Run, images: list[Any], inference_ms: int) -> Status | None:
        req = run.request
        fmt = req["output_format"]
        encode_s = upload_s = 0.0
        outputs = []
        cells = sweep_cells(req)
        items: list[tuple[Any, int | None, dict[str, Any], dict[str, Any]]] = []
        flags = run.flags or [False] * len(images)
        # Flagged images are blurred, or withheld (None: nothing encoded or stored).
        shown = [image if not flag else blur(image) if run.safety_action == "blur" else None
                 for image, flag in zip(images, flags, strict=True)]
        for i, image in enumerate(shown):
            if cells:
                cell = cells[i]
                items.append((image, cell["seed"], {**req, "steps": cell["steps"],
                              "guidance_scale": cell["guidance_scale"]},
                              {"sweep": cell["label"]}))
            else:
                items.append((image, req["seed"] + i, req, {}))
            if run.flags is not None:
                items[-1][3].update(nsfw=flags[i])
                if flags[i]:
                    items[-1][3].update({"blurred" if image is not None else "withheld": True})
        if cells:  # the contact sheet: one more output, after the cells
            from worker.grid import contact_sheet

            tiles = [im if im is not None else placeholder(images[i].size)
                     for i, im in enumerate(shown)]
            items.append((contact_sheet(tiles, cells), None, req, {"contact_sheet": True}))
        for i, (image, seed, enc_req, extra) in enumerate(items):
            if image is None:
                output = {"index": i, "key": None, "url": None, "seed": seed,
                          "width": images[i].width, "height": images[i].height,
                          "content_type": None, "bytes": 0, "sha256": None, **extra}
                outputs.append(output)
                self._write(run, EventType.OUTPUT, {"output": output}, outputs=list(outputs))
                continue
            t0 = time.perf_counter()
            data = encoding.encode(image, enc_req, seed, self.settings.png_compress_level)
            t1 = time.perf_counter()
            key = self.storage.key(run.job_id, f"{i}.{EXTENSIONS[fmt]}")
            self._check_fence(run)
            self.storage.put(key, data, CONTENT_TYPES[fmt])
            upload_s += time.perf_counter() - t1
            encode_s += t1 - t0
            output = {
                "index": i,
                "key": key,
                "url": self.storage.url(key),
                "seed": seed,
                "width": image.width,
                "height": image.height,
                "content_type": CONTENT_TYPES[fmt],
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                **extra,
            }
            outputs.append(output)
            self._write(run, EventType.OUTPUT, {"output": output}, outputs=list(outputs))
        timings = {"inference_ms": inference_ms, "encode_ms": _ms(encode_s)}
        t2 = time.perf_counter()
        manifest = self._manifest(run, outputs, timings)
        key = self.storage.key(run.job_id, "manifest.json")
        # No fence check here: the last job.output compare-and-set proved the token a
        # moment ago (only the manifest's JSON was built since).
        self.storage.put(key, manifest, "application/json")
        timings["upload_ms"] = _ms(upload_s + time.perf_counter() - t2)
        return self._finish(run, Status.SUCCEEDED, outputs=outputs, timings=timings)

    def _manifest(self, run: Run, outputs: list[dict[str, Any]], timings: dict[str, int]) -> bytes:
        req = run.request
        model = self.models[req["model"]]
        body = {
            "job_id": run.job_id,
            "request": {k: v for k, v in req.items() if k not in ("image", "mask")},
            "init_image_sha256": run.init_sha256,
            "safety": None if run.flags is None else {
                "checker": self.settings.safety_checker, "action": run.safety_action,
                "flagged": [i for i, f in enumerate(run.flags) if f]},
            "mask_sha256": run.mask_sha256,
            "seeds": ([c["seed"] for c in sweep_cells(req)]
                      or [req["seed"] + i for i in range(req["num_images"])]),
            "model": model.source,
            "versions": self.versions,
            "worker": self.worker_name,
            "attempt": run.doc["attempts"],
            "timings": timings,
            "outputs": [{k: v for k, v in o.items() if k != "url"} for o in outputs],
        }
        return json.dumps(body, indent=2, sort_keys=True).encode()

    # -- writes, all fenced by the run's token -------------------------------------

    def _check_fence(self, run: Run) -> None:
        """Before writing an object: stop if another run owns the job now, so a run
        that lost its job does not overwrite the winner's files (it narrows the window
        to one round trip; keys are the same, and the bytes too on the same device)."""
        if self.store.token(run.job_id) != run.token:
            run.fenced.set()
            raise Fenced(run.job_id)

    def _write(self, run: Run, event: EventType, data: dict[str, Any], **changes: Any) -> None:
        with run.lock:
            doc = dict(run.doc, **changes)
            out = self.store.apply(
                run.job_id, allowed=Status.RUNNING.value, token=run.token, doc=doc,
                events=[(event, data)],
            )
            if not out.ok:
                run.fenced.set()
                raise Fenced(run.job_id)
            run.doc = doc

    def _write_progress(self, run: Run, progress: dict[str, int]) -> bool:
        """A progress event, unless the denoising loop has ended meanwhile (the job's
        own events follow it, and no progress event may come after them)."""
        with run.lock:
            if run.generated:
                return False
            doc = dict(run.doc, progress=progress)
            out = self.store.apply(
                run.job_id, allowed=Status.RUNNING.value, token=run.token, doc=doc,
                events=[(EventType.PROGRESS, progress)],
            )
            if not out.ok:
                run.fenced.set()
                raise Fenced(run.job_id)
            run.doc = doc
            return True

    def _finish(
        self, run: Run, status: Status, *, error: dict[str, Any] | None = None,
        outputs: list[dict[str, Any]] | None = None, timings: dict[str, int] | None = None,
    ) -> Status | None:
        finished = now_iso()
        created = parse_iso(run.doc["created_at"]).timestamp()
        started = parse_iso(run.doc["started_at"]).timestamp()
        all_timings = {
            "queued_ms": _ms(started - created),
            **(timings or {}),
            "total_ms": _ms(parse_iso(finished).timestamp() - created),
        }
        progress = dict(run.doc["progress"])
        if status is Status.SUCCEEDED:
            progress = {"step": run.total, "total": run.total}
        changes: dict[str, Any] = {
            "status": status.value, "finished_at": finished, "error": error,
            "timings": all_timings, "progress": progress,
        }
        if outputs is not None:
            changes["outputs"] = outputs
        with run.lock:
            doc = dict(run.doc, **changes)
            out = self.store.apply(
                run.job_id, allowed=Status.RUNNING.value, token=run.token, doc=doc,
                events=[terminal_event(doc)],
            )
            if not out.ok:
                log.warning("job %s: %s not recorded (%s)", run.job_id, status, out.detail)
                return None
            run.doc = doc
        self.metrics.job_ended(run.request["model"], status.value, error, all_timings)
        log.info("job %s %s", run.job_id, status.value)
        return status


class Monitor(threading.Thread):
    """Beside the denoising loop of whichever job holds the GPU (one at a time):
    publishes its throttled progress, and turns a cancel request (pushed to the job's
    cancel list) into the run's cancel flag at once.

    One long-lived thread per worker process, not one per job: a thread and a Redis
    connection per job cost milliseconds of GIL and scheduler time at every job's
    start, which a queue of short jobs pays in full. It blocks on the watched job's
    cancel list for at most ``block_s``, so it moves to the next job within that.
    """

    def __init__(self, runner: Runner) -> None:
        super().__init__(name="atelier-monitor", daemon=True)
        self.runner = runner
        self._guard = threading.Lock()
        self._run: Run | None = None
        self._wake = threading.Event()
        interval = runner.settings.progress_interval_s
        self.block_s = min(max(interval, 0.05), 0.25)

    def watch(self, run: Run) -> None:
        with self._guard:
            self._run = run
        self._wake.set()

    def unwatch(self, run: Run) -> None:
        # No wait: the GPU goes to the next job while this thread may still sit in
        # BLPOP on this job's list for up to block_s.
        with run.lock:
            run.generated = True
        with self._guard:
            if self._run is run:
                self._run = None

    def _current(self) -> Run | None:
        with self._guard:
            return self._run

    def run(self) -> None:
        store, settings = self.runner.store, self.runner.settings
        watched: Run | None = None
        sent, last_emit = 0, 0.0
        while True:
            run = self._current()
            if run is None:
                self._wake.wait()
                self._wake.clear()
                continue
            if run is not watched:
                watched, sent, last_emit = run, 0, 0.0
            try:
                # Blocks up to block_s; returns at once when a cancel is pushed.
                if store.wait_for_cancel(run.job_id, self.block_s):
                    run.cancel.set()
                step = run.step
                now = time.monotonic()
                if step > sent and now - last_emit >= settings.progress_interval_s:
                    progress = {"step": step, "total": run.total}
                    if self.runner._write_progress(run, progress):
                        sent, last_emit = step, now
            except Fenced:
                self.unwatch(run)
            except Exception:
                log.warning("job %s: progress update failed", run.job_id, exc_info=True,
                            extra={"job_id": run.job_id})
                time.sleep(self.block_s)


@contextlib.contextmanager
def _held(lock: threading.Lock, before_release: Callable[[], None] | None = None,
          ) -> Iterator[None]:
    """Release an already acquired lock when the block ends (calling ``before_release``
    while still holding it, so the next holder's ``begin`` cannot come between)."""
    try:
        yield
    finally:
        try:
            if before_release is not None:
                before_release()
        finally:
            lock.release()


def _takes_size(pipe: Any) -> bool:
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    return "width" in params and "height" in params


def _internal(exc: BaseException) -> dict[str, Any]:
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
