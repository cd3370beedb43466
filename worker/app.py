"""The worker process: load models, then serve their queues through Celery.

``python -m worker --model tiny-sdxl`` (or ``atelier worker``). Order matters:

1. read settings, set torch threads and the GIL's switch interval, pick the device
   (CUDA is first touched here, in the process that will run the jobs; the threads
   pool never forks);
2. load and warm every model, before a single message is taken;
3. start a Celery worker on the threads pool: ``worker_concurrency`` slots take turns
   on the GPU (one generation at a time), so one job's encoding and upload overlap the
   next one's generation. Time limits do not apply to this pool: the step callback
   enforces ``timeout_s``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import socket
import sys
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Reject
from celery.signals import setup_logging, worker_ready, worker_shutting_down

from producer.core import keys as K
from producer.core.contract import Kind, Status, now_iso
from producer.core.errors import GiveBack, JobEndedFailed
from producer.core.logs import configure as configure_logging
from producer.core.logs import job_context
from producer.core.registry import Registry
from producer.core.settings import Settings, get_settings
from producer.core.storage import storage_from_settings
from producer.jobs.broker import make_celery
from producer.jobs.store import JobStore
from worker import broker_guard
from worker.affinity import Pinning
from worker.heartbeat import Heartbeat, memory
from worker.lifecycle import Lifecycle

log = logging.getLogger("atelier.worker")

#: The process's Lifecycle, set by main() before the worker consumes.
_lifecycle: Lifecycle | None = None


def create_app(settings: Settings) -> Celery:
    app = make_celery(settings, "atelier-worker")

    for name, kind in ((K.TASK_GENERATE, Kind.GENERATE), (K.TASK_TRAIN, Kind.TRAIN)):
        # JobEndedFailed is expected: Celery logs it in one line, without a traceback.
        # (Registered by call, not as a decorator: Celery's decorators are untyped.)
        app.task(
            name=name,
            acks_late=True,
            reject_on_worker_lost=True,
            throws=(JobEndedFailed,),
            bind=True,
        )(_task(kind))
    return app


def _task(kind: Kind) -> Any:
    """The Celery task of one kind of job: the same adapter for every kind."""

    def run_job(task: Any, job_id: str) -> None:
        # An adapter: parse the message, run plain code. Job failures are recorded on
        # the job itself; the message is acknowledged whatever the outcome.
        if _lifecycle is None:  # pragma: no cover - main() sets it before consuming
            raise RuntimeError("worker has no lifecycle")
        # The message's delivery tag names it in kombu's unacked hash: the job's lease
        # records it, so the reconciler can move this very message back if we vanish.
        tag = (getattr(task.request, "properties", None) or {}).get("delivery_tag")
        try:
            with job_context(job_id):
                status = _lifecycle.run(job_id, tag, kind)
        except GiveBack as exc:
            # Warm shutdown (SIGTERM at scale-in) before this job started: back to the
            # head of its queue now, not after the visibility timeout.
            log.info(
                "job %s: not started before shutdown; requeued", job_id, extra={"job_id": job_id}
            )
            raise Reject("worker shutting down", requeue=True) from exc
        except redis.RedisError as exc:
            # The job store is unreachable, so the outcome could not be recorded.
            # Celery would acknowledge a failed task and lose the job: put it back
            # instead (if the broker is down too, the unacked message stays behind and
            # the reconciler moves it back: its lease runs out, or, never leased, it is
            # older than the grace). Attempts and fencing keep the outcome single.
            log.warning(
                "job %s: job store unreachable (%s); requeued",
                job_id,
                exc,
                extra={"job_id": job_id},
            )
            time.sleep(2)
            raise Reject(str(exc), requeue=True) from exc
        if status is Status.FAILED:
            # Recorded already; raised so the task reads FAILURE in Flower, not SUCCESS.
            raise JobEndedFailed(job_id)

    run_job.__name__ = run_job.__qualname__ = kind
    return run_job


def _check_redis(store: JobStore) -> None:
    """Warn when Redis may drop jobs: evicting keys, or keeping nothing on disk."""
    try:
        policy = store.redis.config_get("maxmemory-policy").get("maxmemory-policy")
        aof = store.redis.config_get("appendonly").get("appendonly")
    except redis.RedisError:  # managed Redis often forbids CONFIG
        return
    if policy not in (None, "noeviction"):
        log.warning(
            "Redis maxmemory-policy is %s: under memory pressure it can evict "
            "queued jobs. Use noeviction.",
            policy,
        )
    if aof == "no":
        log.warning("Redis appendonly is off: a Redis restart loses every queued job.")


def _route_library_logs(log_format: str) -> None:
    """diffusers and transformers log through stderr handlers of their own and draw
    progress bars: send their records through ours instead, and draw no bars in a JSON
    log (one JSON object a line, nothing else)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    from huggingface_hub.utils.tqdm import disable_progress_bars

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_default_handler()
        lib.enable_propagation()
        if log_format == "json":
            lib.disable_progress_bar()
    if log_format == "json":
        disable_progress_bars()


def _quiet_shutdown(worker: Any) -> None:
    """Celery writes "worker: Warm shutdown" straight to stdout on SIGTERM; in a JSON log
    the ``worker_shutting_down`` handler logs it instead. Best effort: Celery internals."""
    try:
        from celery.apps.worker import install_worker_term_handler

        if worker is not None:
            install_worker_term_handler(worker, verbose=False)
    except (ImportError, TypeError, ValueError) as exc:  # pragma: no cover
        log.debug("shutdown message left to Celery: %s", exc)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    return platform.processor() or platform.machine() or "cpu"


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, Settings, Registry, list[str]]:
    """The command line over the settings; the models to serve, checked."""
    parser = argparse.ArgumentParser(prog="atelier worker")
    parser.add_argument(
        "--model",
        action="append",
        help="model to serve (repeatable); default: ATELIER_DEFAULT_MODEL",
    )
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default ATELIER_DEVICE)")
    parser.add_argument(
        "--concurrency", type=int, help="jobs held at once (default ATELIER_WORKER_CONCURRENCY)"
    )
    parser.add_argument("--loglevel", help="default ATELIER_LOG_LEVEL (INFO)")
    parser.add_argument(
        "--train",
        action="store_true",
        help="also run trainings of the models served (queues atelier.train.<model>)",
    )
    args = parser.parse_args(argv)

    settings = get_settings()
    args.loglevel = args.loglevel or settings.log_level
    configure_logging(settings.log_format, args.loglevel)
    overrides = {}
    if args.device:
        overrides["device"] = args.device
    if args.concurrency is not None:
        overrides["worker_concurrency"] = args.concurrency
    if overrides:  # through the validators again: limits and derived values
        try:
            settings = Settings(**{**settings.model_dump(), **overrides})
        except ValueError as exc:
            parser.error(str(exc))
    explicit_vt = settings.visibility_timeout_s
    if explicit_vt and explicit_vt < settings.visibility_floor_s:
        log.warning(
            "ATELIER_VISIBILITY_TIMEOUT_S=%d is below %d s, the longest this worker "
            "can hold a message: kombu will hand long jobs' messages to a second "
            "worker, which drops them while the first run's lease lives",
            settings.visibility_timeout_s,
            settings.visibility_floor_s,
        )
    registry = Registry.load(settings.models_file)
    names = args.model or [settings.default_model]
    unknown = [n for n in names if registry.get(n) is None]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {registry.names()}")
    return args, settings, registry, names


def _load_models(
    settings: Settings,
    registry: Registry,
    names: list[str],
) -> tuple[str, dict[str, Any]]:
    """Steps 1-2: torch in this process only, then every model loaded and warmed."""
    import torch

    _route_library_logs(settings.log_format)
    from worker.diffusion.pipelines import load_model, resolve_device, warm_up

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    # The thread that feeds the device gives the GIL up at every torch op and must win
    # it back each time; when another thread holds it (post-processing, Celery's
    # consumer, the monitor), Python's default makes it wait up to 5 ms. Measured with
    # bench/pipeline_efficiency.py (docs/benchmarks.md, 2026-12-07): median ratio 0.942
    # at 5 ms, 0.970 at 0.5 ms.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    device = resolve_device(settings.device)
    models = {}
    for name in names:
        models[name] = load_model(registry[name], settings, device)
        warm_up(models[name])

    # Hundreds of thousands of objects (modules, weights' wrappers, configs) live as
    # long as the process: take them out of the cyclic GC's view, or each full
    # collection walks them all (~0.2 s for tiny-sdxl here, with every thread stopped,
    # the denoising loop included).
    gc.collect()
    gc.freeze()
    return device, models


def _build_lifecycle(
    settings: Settings,
    registry: Registry,
    store: JobStore,
    models: dict[str, Any],
    device: str,
    worker_name: str,
    train: bool = False,
    pinning: Pinning | None = None,
) -> Lifecycle:
    """The lifecycle with this worker's kinds of job (generation; trainings with
    ``--train``), and its metrics."""
    from worker.diffusion.loras import LoraCache
    from worker.diffusion.safety import load_checker
    from worker.generation import Generation
    from worker.metrics import WorkerMetrics

    storage = storage_from_settings(settings)
    metrics = WorkerMetrics()
    generation = Generation(
        settings,
        models,
        store,
        storage,
        loras=LoraCache(settings, registry, storage),
        safety=load_checker(settings, device),
    )
    works: list[Any] = [generation]
    if train:
        from worker.training import Training

        works.append(
            Training(settings, models, store, storage, device=str(device), generation=generation)
        )
    lifecycle = Lifecycle(settings, store, worker_name, works, metrics=metrics, pinning=pinning)
    metrics.watch(lifecycle.activity, lambda: memory(str(device)))
    if settings.metrics_port:
        from producer.core.metrics import serve

        serve(metrics.registry, settings.metrics_port)
    return lifecycle


def _pin(settings: Settings) -> Pinning | None:
    """ATELIER_DEVICE_CPUS: the main thread takes the host's CPUs (every thread started
    after inherits them); the slot that holds the device moves to the device's."""
    try:
        pinning = Pinning.from_settings(settings)
    except ValueError as exc:
        raise SystemExit(f"atelier worker: {exc}") from None
    if pinning is not None:
        pinning.to_host()
    return pinning


def _connect_signals(
    settings: Settings, worker_name: str, queues: str, device: str, pinning: Pinning | None = None
) -> None:
    def _ready(sender: Any = None, **_: object) -> None:
        pinned = f", {pinning.describe()}" if pinning is not None else ""
        log.info(
            "atelier worker ready: %s serving %s on %s (GIL switch interval %g ms%s)",
            worker_name,
            queues,
            device,
            round(sys.getswitchinterval() * 1000, 3),
            pinned,
        )
        if settings.log_format == "json":
            _quiet_shutdown(getattr(sender, "controller", None))

    def _stopping(sig: str = "", how: str = "", **_: object) -> None:
        log.info("atelier worker %s: %s shutdown (%s)", worker_name, how.lower(), sig)
        # Celery's warm shutdown stops taking messages and waits for its tasks; a task
        # still waiting for the GPU would start a whole new job first. Give it back.
        if _lifecycle is not None:
            _lifecycle.drain()

    def _keep_logging(**_: object) -> None:
        """Logging is ours (configured above): Celery adds no handler of its own."""

    # Connected by call, not as decorators (Celery's are untyped); weak=False keeps these
    # local functions alive.
    worker_ready.connect(_ready, weak=False)
    worker_shutting_down.connect(_stopping, weak=False)
    setup_logging.connect(_keep_logging, weak=False)


def main(argv: list[str] | None = None) -> int:
    args, settings, registry, names = _parse(argv)
    pinning = _pin(settings)  # before any other thread starts: they inherit it
    device, models = _load_models(settings, registry, names)

    store = JobStore.from_url(settings.redis_url, settings.result_ttl_s)
    _check_redis(store)
    global _lifecycle
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    _lifecycle = lifecycle = _build_lifecycle(
        settings, registry, store, models, device, worker_name, train=args.train, pinning=pinning
    )
    app = create_app(settings)
    from producer.services.reconciler import build as build_reconciler

    metrics = lifecycle.metrics
    reconciler = build_reconciler(
        settings,
        store,
        registry,
        app,
        worker_name,
        counted=lambda reason: metrics.reconciled.labels(reason).inc(),
    )
    lanes = [*names, *(K.lane(n, Kind.TRAIN) for n in names if args.train)]
    queues = ",".join(K.queue_name(n) for n in lanes)
    heartbeat = _start_heartbeat(settings, store, lifecycle, worker_name, names, device)
    reconciler.start()
    _connect_signals(settings, worker_name, queues, device, pinning)

    try:
        _consume(app, settings, worker_name, queues, args.loglevel)  # 3. Consume.
    finally:
        reconciler.stop()
        heartbeat.stop()
    return 0


def _start_heartbeat(
    settings: Settings,
    store: JobStore,
    lifecycle: Lifecycle,
    worker_name: str,
    names: list[str],
    device: str,
) -> Heartbeat:
    """The first beat now (a failure only warned of), then one every period."""
    heartbeat = Heartbeat(
        store,
        lifecycle,
        {
            "id": worker_name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "models": names,
            "device": str(device),
            "device_name": _device_name(str(device)),
            "concurrency": settings.worker_concurrency,
            "started_at": now_iso(),
        },
        settings.worker_heartbeat_s,
    )
    try:
        heartbeat.beat()
    except redis.RedisError as exc:
        log.warning("heartbeat failed: %s", exc)
    heartbeat.start()
    return heartbeat


def _consume(app: Celery, settings: Settings, worker_name: str, queues: str, loglevel: str) -> None:
    """Step 3: the Celery worker on the threads pool, until it shuts down."""
    broker_guard.install()  # a Redis restart must not stop the worker (worker/broker_guard)
    # --quiet: no banner on stdout (a JSON log holds only JSON lines).
    quiet = ["--quiet"] if settings.log_format == "json" else []
    app.worker_main(
        [
            *quiet,
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={queues}",
            f"--hostname=atelier@{worker_name.replace(':', '-')}",
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={loglevel.upper()}",
        ]
    )
