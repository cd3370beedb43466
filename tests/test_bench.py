"""Each benchmark script runs end to end with a tiny job count and prints, as its last
stdout line, one JSON object with the fields docs/benchmarks.md defines. Smoke only: the
figures of such short runs mean nothing and are not checked against targets (the scripts
are run in full by hand: docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, models_dir: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if models_dir is not None:
        env["ATELIER_MODELS_DIR"] = str(models_dir)
    out = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(last)
    return result


def positive(result: dict[str, Any], *fields: str) -> None:
    for name in fields:
        value = result[name]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (name, value)


def test_overhead() -> None:
    r = run_bench("overhead.py", "--jobs", "5")
    assert r["bench"] == "overhead" and r["jobs"] == 5
    positive(r, "p50_ms", "p99_ms", "jobs_per_s", "celery_p50_ms", "celery_jobs_per_s", "ratio_p50")
    assert r["p99_ms"] >= r["p50_ms"]
    assert r["ratio_p50"] == pytest.approx(r["p50_ms"] / r["celery_p50_ms"], rel=0.01)


def test_duty_cycle() -> None:
    r = run_bench(
        "duty_cycle.py", "--jobs", "3", "--gpu-ms", "20", "--concurrency", "2", "--size", "512"
    )
    assert r["bench"] == "duty_cycle" and r["jobs"] == 3 and r["gpu_ms"] == 20
    positive(r, "efficiency", "naive_efficiency", "speedup")
    assert r["efficiency"] <= 1.05 and r["naive_efficiency"] <= 1.05
    # Inline post-processing of a 512² PNG (~80 ms, and the upload) against 20 ms of
    # "GPU": the naive worker's GPU is idle most of the time. An ordering, not a target.
    assert r["naive_efficiency"] < r["efficiency"]
    assert r["png_bytes_p50"] > 250_000  # a realistic picture, not a flat one


def test_pipeline_efficiency(models_dir: Path) -> None:
    # 24 steps: jobs long enough that their progress (and so a preview) is published
    # at least once, however fast the machine (the monitor publishes at most every
    # PROGRESS_INTERVAL_S and may take up to 0.25 s to move to the next job).
    r = run_bench(
        "pipeline_efficiency.py",
        "--images",
        "2",
        "--rounds",
        "1",
        "--steps",
        "24",
        models_dir=models_dir,
    )
    assert r["bench"] == "pipeline_efficiency" and r["images"] == 2 and r["steps"] == 24
    positive(
        r,
        "worker_images_per_s",
        "bare_images_per_s",
        "ratio",
        "preview_images_per_s",
        "preview_ratio",
        "bare_ms_per_image",
        "worker_inference_ms_mean",
        "worker_ms_per_image",
    )
    assert r["previews"] >= 1  # the preview jobs' progress events carried pictures
    # Both sides' device is one CPU core (the bench refuses a worker that did not pin).
    cpus = sorted(os.sched_getaffinity(0))
    assert r["device_cpu"] == (cpus[-1] if len(cpus) > 1 else None)


def test_gpu_without_cuda_exits_cleanly() -> None:
    import torch

    r = run_bench("gpu.py")
    assert r["bench"] == "gpu"
    if not torch.cuda.is_available():
        assert r["status"] == "skipped" and "needs a CUDA GPU" in r["reason"]


def test_gpu_plumbing_on_the_cpu(models_dir: Path) -> None:
    r = run_bench(
        "gpu.py",
        "--device",
        "cpu",
        "--model",
        "tiny-sdxl",
        "--size",
        "64",
        "--steps",
        "2",
        "--images",
        "1",
        "--sets",
        "fast,small-card",
        models_dir=models_dir,
    )
    assert r["status"] == "ok" and r["device"] == "cpu"
    fast, small = r["results"]
    assert fast["options"] == {"channels_last": True, "fuse_qkv": True}
    positive(fast, "it_per_s", "s_per_image")
    assert "skipped" in small  # model CPU offload needs a CUDA device


def test_recovery() -> None:
    # 20 jobs of 300 ms on 2 workers: the kill, 1-2 s in, finds jobs held.
    r = run_bench(
        "recovery.py",
        "--jobs",
        "20",
        "--workers",
        "2",
        "--kills",
        "1",
        "--gpu-ms",
        "300",
        "--rate",
        "20",
    )
    assert r["bench"] == "recovery" and r["jobs"] == 20 and r["kills"] == 1
    assert r["lost"] == 0 and r["duplicate_outcomes"] == 0
    positive(r, "recovery_s_p50", "recovery_s_max")
    assert r["recovery_s_max"] >= r["recovery_s_p50"]


def test_list_jobs() -> None:
    r = run_bench("list_jobs.py", "--jobs", "200", "--reads", "5")
    assert r["bench"] == "list_jobs" and r["jobs"] == 200
    assert [row["owner_jobs"] for row in r["rows"]] == [100, 200, 100]
    for row in r["rows"]:
        positive(
            row,
            "store_p50_ms",
            "store_deep_p50_ms",
            "store_filtered_p50_ms",
            "api_p50_ms",
            "api_filtered_p50_ms",
        )
    positive(r, "api_p50_ratio", "store_p50_ratio", "fill_s", "index_bytes_per_job")


def test_conditioning(models_dir: Path) -> None:
    r = run_bench(
        "conditioning.py",
        "--repeat",
        "1",
        "--steps",
        "2",
        "--only",
        "two_controls,reference",
        models_dir=models_dir,
    )
    assert r["bench"] == "conditioning" and r["repeat"] == 1
    assert set(r["added_ms"]) == {"two_controls", "reference"}
    positive(r["median_ms"], *r["median_ms"])
    flux = run_bench(
        "conditioning.py",
        "--model",
        "tiny-flux",
        "--repeat",
        "1",
        "--steps",
        "2",
        "--only",
        "four_references,img2img_control",
        models_dir=models_dir,
    )
    assert flux["model"] == "tiny-flux"
    assert set(flux["added_ms"]) == {"four_references", "img2img_control"}
    positive(flux["median_ms"], *flux["median_ms"])
