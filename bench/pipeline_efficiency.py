"""tiny-sdxl images per second through the whole worker, against a bare diffusers loop.

The worker: jobs submitted through the client, run by ``python -m worker`` (2 slots,
one generation at a time), each image encoded as PNG and stored with its manifest,
every event written; timed from the first submit to the last job stored. Storage is a
local folder by default; ``--storage s3`` uploads to moto's S3 server over HTTP, whose
request handling (~10 ms of CPU per object in moto, ~2 ms in boto3) then competes
for this machine's two cores with the "GPU" (a CPU core here, a separate device on a
real host). The bare loop: ``StableDiffusionXLPipeline`` loaded from the same
folder in one process, called in a loop with the same request (64², 4 steps,
guidance 5, Euler, a seeded generator, PIL output), nothing stored.

Both run torch on one intra-op thread (``ATELIER_TORCH_THREADS=1``), on the same CPU
core: ``--device-cpu`` (default: the last CPU this bench may use) is the "GPU" of both
sides. The bare loop's process is pinned to it; the worker's slot that holds the device
moves there (``ATELIER_DEVICE_CPUS``) and every other thread of the worker, Redis, moto
and this script run on the other CPUs, as a GPU host's CPU does encoding, upload and
Redis beside its GPU. The question asked is how much device time the worker loses, not
how fast two cores denoise. Pinned, both sides time the same core: unpinned, they time
whichever core the scheduler gave each process, and this machine's two vCPUs differ by
up to 10 % (docs/benchmarks.md, 2026-12-07). The worker's other threads still take the
GIL from its denoising loop, and that is measured. ``--device-cpu -1``: nothing pinned.

The two alternate in ``--rounds`` chunks (the bare loop in its own long-lived
process), so that load from other processes during the run falls on both alike.

Previews: each round also runs the worker's chunk again with ``preview: true`` (the
same requests, the worker's default ``PREVIEW_INTERVAL_S`` and ``PREVIEW_MAX_SIDE``),
the two worker chunks in alternating order; ``preview_ratio`` is images/s with previews
over images/s without (target ≥ 0.98). ``previews`` counts the previews the jobs'
progress events carried. A job gets one only if it is still denoising when the monitor
first publishes its progress (up to ~0.25 s after it starts, then one per
``PREVIEW_INTERVAL_S``): the default 4-step jobs (~0.2 s on a quiet 2-core machine) may
get none, and then ``preview_ratio`` is null, since it would measure nothing. Measure
previews on jobs that have them: ``--steps 24 --images 40 --rounds 8`` (~1 s a job, one
preview each, ~2.5 minutes).

    python bench/pipeline_efficiency.py [--images 120] [--rounds 24] [--storage file|s3]
                                        [--steps 4] [--device-cpu N]

Last stdout line: {"bench": "pipeline_efficiency", "images", "worker_images_per_s",
"bare_images_per_s", "ratio", ..., "bare_ms_per_image", "worker_inference_ms_mean",
"worker_ms_per_image", "device_cpu", "preview_images_per_s", "preview_ratio",
"previews"}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Bench,
    Reference,
    add_models_dir,
    bare_tiny_sdxl,
    emit,
    load_average,
    log,
    pin,
    serve_reference,
)

REQUEST = {
    "prompt": "a lighthouse at dusk, oil on canvas",
    "steps": 4,
    "guidance_scale": 5.0,
    "width": 64,
    "height": 64,
    "scheduler": "euler",
}


def bare_server(models_dir: str) -> None:
    """The reference loop, in a child process: loads, warms up, then for each line
    ``N SEED`` on stdin generates N images and answers with a JSON line."""
    import torch

    pipe = bare_tiny_sdxl(models_dir)
    pipe.set_progress_bar_config(disable=True)

    def one(seed: int) -> None:
        with torch.inference_mode():
            pipe(
                prompt=REQUEST["prompt"],
                num_inference_steps=REQUEST["steps"],
                guidance_scale=REQUEST["guidance_scale"],
                width=REQUEST["width"],
                height=REQUEST["height"],
                output_type="pil",
                generator=torch.Generator("cpu").manual_seed(seed),
            )

    def images(n: int, seed: int) -> None:
        for i in range(n):
            one(seed + i)

    for i in range(3):  # warm-up, as the worker does before consuming
        one(i)
    serve_reference(images, "images")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    REQUEST["steps"] = args.steps
    if args.bare_server:
        bare_server(args.models_dir)
        return 0

    from producer import Client

    device_cpu = resolve_device_cpu(parser, args.device_cpu)
    pinned = device_cpu >= 0
    t_start = time.perf_counter()
    chunks = [
        args.images // args.rounds + (1 if i < args.images % args.rounds else 0)
        for i in range(args.rounds)
    ]
    load_before = load_average()
    with Bench(s3=args.storage == "s3") as bench:
        # Both loaded, warmed and idle before anything is timed.
        worker = bench.worker(
            ["tiny-sdxl"],
            models_dir=args.models_dir,
            wait=False,
            device_cpus=str(device_cpu) if pinned else None,
        )
        reference = Reference(
            bench, __file__, ["--models-dir", args.models_dir, "--steps", str(args.steps)]
        )
        worker.wait_ready(timeout=180)
        if pinned:
            pin_device(bench, worker, reference, device_cpu)
        settings = bench.settings(models_dir=args.models_dir, default_model="tiny-sdxl")
        with Client(settings) as client:
            for i in range(2):  # connections, the first upload
                client.wait(client.submit(REQUEST, seed=i), timeout=120)
            tally = run_rounds(client, reference, chunks)
            previews = sum(
                1
                for job_id in tally.preview_ids
                for e in client.store.events(job_id)
                if "preview" in e["data"]
            )
    report(args, tally, previews, device_cpu if pinned else None, t_start, load_before)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=120)
    add_models_dir(parser)
    parser.add_argument(
        "--rounds", type=int, default=24, help="alternations of bare loop and worker (default 24)"
    )
    parser.add_argument("--storage", choices=["file", "s3"], default="file")
    parser.add_argument(
        "--steps", type=int, default=4, help="denoising steps per image, both sides (default 4)"
    )
    parser.add_argument(
        "--device-cpu",
        type=int,
        default=None,
        help="the CPU core that is both sides' device (default: the last "
        "one this bench may use; -1: pin nothing)",
    )
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    return parser


def resolve_device_cpu(parser: argparse.ArgumentParser, device_cpu: int | None) -> int:
    """The device's CPU (-1: nothing pinned); refuses one this bench may not use, or
    the only one."""
    allowed = sorted(os.sched_getaffinity(0))
    if device_cpu is None:
        device_cpu = allowed[-1] if len(allowed) > 1 else -1
    if device_cpu >= 0 and (device_cpu not in allowed or len(allowed) < 2):
        parser.error(
            f"--device-cpu {device_cpu}: needs one of {allowed} and another CPU for the rest"
        )
    return device_cpu


def pin_device(bench: Bench, worker: Any, reference: Reference, device_cpu: int) -> None:
    # The device: the bare loop, and the worker's slot while it holds it. The
    # rest (the worker pins its own other threads) on the other CPUs.
    if f"device thread on CPUs {device_cpu}," not in worker.log():
        raise RuntimeError("the worker did not pin its device thread:\n" + worker.log()[-2000:])
    host = set(os.sched_getaffinity(0)) - {device_cpu}
    pin(reference.proc.pid, {device_cpu})
    for server in (bench.redis, bench.s3_server):
        if server is not None and server.proc is not None:
            pin(server.proc.pid, host)
    os.sched_setaffinity(0, host)


@dataclass
class Tally:
    """Seconds per side, each round's ratios, and what the worker's jobs recorded."""

    bare_s: float = 0.0
    worker_s: float = 0.0
    preview_s: float = 0.0
    per_round: list[float] = field(default_factory=list)
    preview_rounds: list[float] = field(default_factory=list)
    preview_ids: list[str] = field(default_factory=list)
    inference_ms: list[int] = field(default_factory=list)  # each no-preview job's own timing


def run_rounds(client: Any, reference: Reference, chunks: list[int]) -> Tally:
    tally = Tally()
    seed = 1000
    for r, n in enumerate(chunks):
        # Alternate, so that load from other processes falls on all alike.
        log(f"bare loop: {n} images")
        b = reference.run(n, seed)
        timed: dict[bool, float] = {}
        for preview in (False, True) if r % 2 == 0 else (True, False):
            log(f"worker: {n} jobs, previews {'on' if preview else 'off'}")
            timed[preview], ids, took_ms = run_chunk(client, n, seed, preview)
            if preview:
                tally.preview_ids += ids
            else:
                tally.inference_ms += took_ms
        tally.bare_s += b
        tally.worker_s += timed[False]
        tally.preview_s += timed[True]
        tally.per_round.append(round(b / timed[False], 3))
        tally.preview_rounds.append(round(timed[False] / timed[True], 3))
        seed += n
    return tally


def report(
    args: argparse.Namespace,
    tally: Tally,
    previews: int,
    device_cpu: int | None,
    t_start: float,
    load_before: float,
) -> None:
    worker_s, preview_s = tally.worker_s, tally.preview_s
    worker_ips = args.images / worker_s
    bare_ips = args.images / tally.bare_s
    emit(
        {
            "bench": "pipeline_efficiency",
            "images": args.images,
            "worker_images_per_s": round(worker_ips, 3),
            "bare_images_per_s": round(bare_ips, 3),
            "ratio": round(worker_ips / bare_ips, 4),
            "rounds": args.rounds,
            "round_ratios": tally.per_round,
            "ratio_median_round": round(statistics.median(tally.per_round), 4),
            "storage": args.storage,
            "steps": args.steps,
            # Where the worker's time goes: its pipeline call (the record's
            # timings.inference_ms: denoising, VAE, safety) against the bare loop's time per
            # image; what the ratio loses beyond their quotient is outside the call.
            "bare_ms_per_image": round(tally.bare_s / args.images * 1000, 1),
            "worker_inference_ms_mean": round(statistics.fmean(tally.inference_ms), 1),
            "worker_ms_per_image": round(worker_s / args.images * 1000, 1),
            "device_cpu": device_cpu,
            "preview_images_per_s": round(args.images / preview_s, 3),
            # No picture was made: the preview arm measured nothing (see the docstring).
            "preview_ratio": round(worker_s / preview_s, 4) if previews else None,
            "preview_round_ratios": tally.preview_rounds,
            "preview_ratio_median_round": round(statistics.median(tally.preview_rounds), 4),
            "previews": previews,
        },
        started=t_start,
        load_before=load_before,
    )


def run_chunk(
    client: Any,
    n: int,
    seed: int,
    preview: bool,
) -> tuple[float, list[str], list[int]]:
    """n jobs through the worker, submit to the last one stored: seconds, the ids, and
    each job's own ``timings.inference_ms``."""
    extra = {"preview": True} if preview else {}
    t0 = time.perf_counter()
    ids = [client.submit(REQUEST, seed=seed + i, **extra) for i in range(n)]
    records = [client.wait(job_id, timeout=300) for job_id in ids]
    took = time.perf_counter() - t0
    bad = [r for r in records if r["status"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not succeed: {bad[0]}")
    return took, ids, [r["timings"]["inference_ms"] for r in records]


if __name__ == "__main__":
    sys.exit(main())
