"""What atelier costs per job beyond Celery itself.

Jobs on a zero-cost pipeline (``pipeline = "simulated"``, ``gpu_ms = 0``, 64² images)
go the whole way: the client validates and submits (message + record + job.queued),
a real worker (``python -m worker``, threads pool, 2 slots) starts the job (Lua
compare-and-set, job.started), "generates", encodes a PNG, uploads it and the
manifest to storage, and succeeds (job.output, job.succeeded); the client follows the
job's event stream until the terminal event. Beside it, on the same Redis, a raw
Celery no-op task round trip (send, run, result via Celery's Redis backend:
bench/celery_noop.py) with the same broker settings and pool.

Latency: ``--jobs`` sequential jobs, atelier and Celery alternating so both see the
same machine load; p50 / p99 of submit → terminal state observed by the caller.
Throughput: ``--jobs`` submitted at once, then all awaited; jobs per second.

Storage: a local folder (``file://``, the worker's LocalStorage) by default, so that
what is measured is the queue and the job's bookkeeping; ``--storage s3`` uploads to
moto's S3 server over HTTP instead, which adds moto's own ~10-15 ms per object (an
image and a manifest per job) and measures moto more than atelier.

    python bench/overhead.py [--jobs 200] [--storage file|s3]

Last stdout line: {"bench": "overhead", "jobs", "p50_ms", "p99_ms", "jobs_per_s",
"celery_p50_ms", "celery_jobs_per_s", "ratio_p50", ...}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.celery_noop import READY, make_app
from bench.common import Bench, emit, load_average, log, percentile, simulated_model

MODEL = "zero"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_before = load_average()
    toml = simulated_model(MODEL, gpu_ms=0, size=64, steps=1)
    with Bench(models_toml=toml, s3=args.storage == "s3") as bench:
        start_workers(bench)
        settings = bench.settings(default_model=MODEL)
        app = make_app(settings)
        timed = measure(settings, app.tasks["bench.noop"], args.jobs)
        app.close()
    report(args, timed, t_start, load_before)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--storage", choices=["file", "s3"], default="file")
    return parser.parse_args(argv)


def start_workers(bench: Bench) -> None:
    """The atelier worker and the Celery no-op worker, both ready."""
    # Both workers start at once; each is ready before anything is measured.
    worker = bench.worker([MODEL], wait=False)
    noop = bench.popen([sys.executable, "bench/celery_noop.py"], "noop.log")
    worker.wait_ready(timeout=180)
    deadline = time.monotonic() + 60
    while READY not in bench.log_text("noop.log"):
        if noop.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("celery no-op worker failed:\n" + bench.log_text("noop.log"))
        time.sleep(0.05)


@dataclass
class Timed:
    """Both sides' sequential latencies (seconds) and the seconds of their bursts."""

    lat_a: list[float]
    lat_c: list[float]
    atelier_s: float
    celery_s: float


def measure(settings: Any, noop_task: Any, jobs: int) -> Timed:
    """Latency (``jobs`` sequential, alternating), then throughput (``jobs`` at once)."""
    from producer import Client

    request = {"prompt": "overhead", "model": MODEL, "steps": 1}
    with Client(settings) as client:

        def atelier_one() -> float:
            t0 = time.perf_counter()
            job_id = client.submit(request)
            record = client.wait(job_id, timeout=60)
            took = time.perf_counter() - t0
            if record["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {record['status']}: {record}")
            return took

        def celery_one() -> float:
            t0 = time.perf_counter()
            noop_task.apply_async().get(timeout=60)
            return time.perf_counter() - t0

        for _ in range(10):  # warm both paths: connections, pub/sub, first imports
            atelier_one()
            celery_one()

        log(f"latency: {jobs} sequential jobs each")
        lat_a: list[float] = []
        lat_c: list[float] = []
        for _ in range(jobs):
            lat_a.append(atelier_one())
            lat_c.append(celery_one())

        log(f"throughput: {jobs} jobs at once each")
        atelier_s = atelier_burst(client, request, jobs)
        t0 = time.perf_counter()
        results = [noop_task.apply_async() for _ in range(jobs)]
        for r in results:
            r.get(timeout=120)
        celery_s = time.perf_counter() - t0
    return Timed(lat_a, lat_c, atelier_s, celery_s)


def atelier_burst(client: Any, request: dict[str, Any], jobs: int) -> float:
    """Seconds from submitting ``jobs`` at once to the last one's end."""
    t0 = time.perf_counter()
    ids = [client.submit(request) for _ in range(jobs)]
    records = [client.wait(job_id, timeout=120) for job_id in ids]
    atelier_s = time.perf_counter() - t0
    failed = [r["id"] for r in records if r["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed: {failed[:5]}")
    return atelier_s


def report(args: argparse.Namespace, timed: Timed, t_start: float, load_before: float) -> None:
    lat_a, lat_c = timed.lat_a, timed.lat_c
    p50 = statistics.median(lat_a) * 1000
    celery_p50 = statistics.median(lat_c) * 1000
    emit(
        {
            "bench": "overhead",
            "jobs": args.jobs,
            "p50_ms": round(p50, 2),
            "p99_ms": round(percentile(lat_a, 0.99) * 1000, 2),
            "jobs_per_s": round(args.jobs / timed.atelier_s, 1),
            "celery_p50_ms": round(celery_p50, 2),
            "celery_p99_ms": round(percentile(lat_c, 0.99) * 1000, 2),
            "celery_jobs_per_s": round(args.jobs / timed.celery_s, 1),
            "ratio_p50": round(p50 / celery_p50, 3),
            "storage": args.storage,
        },
        started=t_start,
        load_before=load_before,
    )


if __name__ == "__main__":
    sys.exit(main())
