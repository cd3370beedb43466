"""How busy the worker keeps its GPU: overlapped post-processing against inline.

A simulated GPU (``pipeline = "simulated"``: ``--gpu-ms`` of ``time.sleep`` per image,
GIL released, as a CUDA kernel leaves it) returns 1024×1024 pictures that cost what a
real SDXL output costs to store: a gradient with Gaussian noise, ~1.8 MB as PNG at
compress level 6, ~0.3 s to encode here (worker/builtin/simulated.py says why that picture).
Each job goes through the real worker: lifecycle, step callback, monitor, PNG encoding,
upload to moto's S3 server over HTTP, events, manifest, acknowledgement.

Two workers are measured one after the other in the same run, on the same Redis and
S3 server, with the same jobs:

- overlap: as shipped (``ATELIER_OVERLAP_POSTPROCESS=true``): the GPU is released
  when the denoising ends; the job is encoded and uploaded while the next generates;
- naive: ``ATELIER_OVERLAP_POSTPROCESS=false``: the GPU is held until the job is
  stored, as a worker that post-processes inline would.

``efficiency`` = ideal GPU time / actual GPU time: ``jobs × gpu_ms`` over the span from
the first job's start on the GPU to the last job's end of generation (record
``started_at`` + ``inference_ms``): the fraction of that span the GPU was busy, the
duty cycle. ``wall_efficiency`` divides by the whole run instead (first submit to last
job stored), which adds one job's queueing and one job's post-processing that no worker
can overlap. ``speedup`` = naive wall time / overlap wall time.

Slots: a job holds a worker slot from message to acknowledgement, so a worker needs
1 + ceil(post-processing / generation) slots to keep the GPU busy. At 300 ms per image
and ~0.35 s to encode and upload, that is 3 (``--concurrency``, default 3); at the
seconds per image of a real SDXL generation, the default 2 suffices.

    python bench/duty_cycle.py [--gpu-ms 300] [--jobs 40] [--concurrency 3]

Last stdout line: {"bench": "duty_cycle", "gpu_ms", "jobs", "efficiency",
"naive_efficiency", "speedup", ...}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, emit, load_average, log, simulated_model
from producer import Client
from producer.core.contract import parse_iso
from producer.core.settings import Settings

SIZE = 1024


def run_jobs(settings: Settings, model: str, jobs: int) -> dict[str, Any]:
    with Client(settings) as client:
        t0 = time.time()
        ids = [client.submit(prompt=f"duty cycle {i}", model=model, seed=i) for i in range(jobs)]
        records = [client.wait(job_id, timeout=600) for job_id in ids]
        wall = time.time() - t0
    bad = [r for r in records if r["status"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not succeed: {bad[0]}")
    starts = [parse_iso(str(r["started_at"])).timestamp() for r in records]
    ends = [s + r["timings"]["inference_ms"] / 1000 for s, r in zip(starts, records, strict=True)]
    t = [r["timings"] for r in records]
    return {
        "span_s": max(ends) - min(starts),
        "wall_s": wall,
        "encode_ms": statistics.median(x["encode_ms"] for x in t),
        "upload_ms": statistics.median(x["upload_ms"] for x in t),
        "inference_ms": statistics.median(x["inference_ms"] for x in t),
        "bytes": statistics.median(o["bytes"] for r in records for o in r["outputs"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-ms", type=float, default=300.0)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--size", type=int, default=SIZE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    load_before = load_average()
    toml = simulated_model("sim-overlap", args.gpu_ms, args.size) + simulated_model(
        "sim-naive", args.gpu_ms, args.size
    )
    with Bench(models_toml=toml, s3=True) as bench:
        overlap = bench.worker(["sim-overlap"], concurrency=args.concurrency, wait=False)
        naive = bench.worker(
            ["sim-naive"], concurrency=args.concurrency, wait=False, overlap_postprocess="false"
        )
        overlap.wait_ready(timeout=180)
        naive.wait_ready(timeout=180)
        settings = bench.settings()
        # A job each first: connections, the first upload, lazy imports.
        run_jobs(settings, "sim-overlap", 1)
        run_jobs(settings, "sim-naive", 1)
        log(f"overlap: {args.jobs} jobs")
        fast = run_jobs(settings, "sim-overlap", args.jobs)
        log(f"naive: {args.jobs} jobs")
        slow = run_jobs(settings, "sim-naive", args.jobs)

    ideal = args.jobs * args.gpu_ms / 1000
    emit(
        {
            "bench": "duty_cycle",
            "gpu_ms": args.gpu_ms,
            "jobs": args.jobs,
            "efficiency": round(ideal / fast["span_s"], 4),
            "naive_efficiency": round(ideal / slow["span_s"], 4),
            "speedup": round(slow["wall_s"] / fast["wall_s"], 3),
            "wall_efficiency": round(ideal / fast["wall_s"], 4),
            "naive_wall_efficiency": round(ideal / slow["wall_s"], 4),
            "concurrency": args.concurrency,
            "encode_ms_p50": fast["encode_ms"],
            "upload_ms_p50": fast["upload_ms"],
            "png_bytes_p50": fast["bytes"],
        },
        started=t_start,
        load_before=load_before,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
