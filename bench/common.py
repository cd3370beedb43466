"""What every benchmark needs: its own redis-server, moto S3 server and worker
subprocesses (the process helpers of the test suite, ``tests/servers.py``), a models
file with the benchmark's simulated models, and one JSON line at the end.

The benchmarks run as scripts (``python bench/overhead.py``): this module puts the
repository root on ``sys.path`` so that ``producer``, ``worker`` and ``tests`` import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from producer.core.settings import Settings  # noqa: E402
from tests.servers import AWS_ENV, RedisServer, S3Server, Worker, stop, wait_port  # noqa: E402

BUCKET = "atelier-bench"

__all__ = [
    "AWS_ENV",
    "BUCKET",
    "ROOT",
    "Bench",
    "Reference",
    "add_models_dir",
    "bare_tiny_sdxl",
    "emit",
    "load_average",
    "log",
    "percentile",
    "serve_reference",
    "simulated_model",
    "stop",
    "wait_port",
]


def simulated_model(name: str, gpu_ms: float, size: int, steps: int = 10) -> str:
    """A ``[models.NAME]`` table for a simulated GPU model (see worker/builtin/simulated.py)."""
    return (
        f'[models."{name}"]\npipeline = "simulated"\nsource = "builtin:simulated"\n'
        f"gpu_ms = {gpu_ms}\nsteps = {steps}\nwidth = {size}\nheight = {size}\n"
        f"max_side = {max(size, 512)}\nmax_pixels = {max(size, 512) ** 2}\n"
    )


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1), interpolated; the median at 0.5."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def emit(
    result: dict[str, Any], started: float | None = None, load_before: float | None = None
) -> None:
    """The benchmark's result: one JSON object, the last line on stdout. Given when the
    run started (``time.perf_counter()``) and the load average then, it ends with the
    machine's load before and after and the run's wall time, for judging the figures."""
    if started is not None:
        result = {
            **result,
            "load_avg_before": load_before,
            "load_avg_1m": load_average(),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    """Redis (+ moto S3 when ``s3``) in a private directory; workers started on demand;
    everything stopped by its pid on exit."""

    models_toml: str = ""
    s3: bool = True
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="atelier-bench-")))
    redis: RedisServer | None = None
    s3_server: S3Server | None = None
    procs: list[Any] = field(default_factory=list)

    def __enter__(self) -> Bench:
        for k, v in AWS_ENV.items():
            os.environ.setdefault(k, v)
        try:
            self.redis = RedisServer(self.workdir / "redis").start()
            self.procs.append(self.redis)
            if self.s3:
                self.s3_server = S3Server().start()
                self.procs.append(self.s3_server)
                import boto3

                boto3.client("s3", endpoint_url=self.s3_server.endpoint).create_bucket(
                    Bucket=BUCKET
                )
        except BaseException:
            self.__exit__()
            raise
        (self.workdir / "models.toml").write_text(self.models_toml)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()

    def values(self, **extra: Any) -> dict[str, Any]:
        assert self.redis is not None
        values: dict[str, Any] = {
            "redis_url": self.redis.url,
            "storage_url": (
                f"s3://{BUCKET}/bench" if self.s3 else f"file://{self.workdir / 'outputs'}"
            ),
            "s3_endpoint_url": self.s3_server.endpoint if self.s3_server else None,
            "models_file": str(self.workdir / "models.toml"),
            "device": "cpu",
            "torch_threads": 1,
            "job_timeout_s": 300,
            "progress_interval_s": 0.5,
        }
        values.update(extra)
        return {k: v for k, v in values.items() if v is not None}

    def settings(self, **extra: Any) -> Settings:
        return Settings(**self.values(**extra))

    def env(self, **extra: Any) -> dict[str, str]:
        env = {**os.environ, **AWS_ENV}
        env.update({f"ATELIER_{k.upper()}": str(v) for k, v in self.values(**extra).items()})
        env["OMP_NUM_THREADS"] = "1"
        return env

    def worker(
        self, models: list[str], concurrency: int | None = None, wait: bool = True, **settings: Any
    ) -> Worker:
        name = "-".join(models)
        w = Worker(
            self.env(**settings),
            self.workdir / "logs" / f"{name}.log",
            models,
            concurrency=concurrency,
        )
        w.start(wait=False)
        self.procs.append(w)
        if wait:
            w.wait_ready(timeout=180)
        return w

    def popen(
        self,
        argv: list[str],
        log_name: str,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "logs" / log_name, "ab") as out:
            proc = subprocess.Popen(
                argv, env=env or self.env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        self.procs.append(_Proc(proc))
        return proc

    def log_text(self, log_name: str) -> str:
        path = self.workdir / "logs" / log_name
        return path.read_text(errors="replace") if path.exists() else ""


class _Proc:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def stop(self) -> None:
        stop(self.proc, grace=30)


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (Linux; threads it starts later
    inherit their creator's)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


class Reference:
    """A bench's bare reference loop in a long-lived child process (``script
    --bare-server ...``), driven by lines: each :meth:`run` sends its arguments as one
    line and reads back ``{"seconds": ...}``; the child says ``{"ready": true}`` once
    loaded and warmed."""

    def __init__(self, bench: Bench, script: str, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(script).resolve()), "--bare-server", *args],
            env=bench.env(),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        bench.procs.append(self)
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bare loop exited with {self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, *args: int) -> float:
        """Seconds the child took for one request (e.g. ``n`` images from ``seed``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(str(a) for a in args) + "\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        stop(self.proc)


def add_models_dir(parser: argparse.ArgumentParser) -> None:
    """``--models-dir``: where the tiny models are (built there when missing)."""
    parser.add_argument(
        "--models-dir",
        default=os.environ.get(
            "ATELIER_MODELS_DIR", str(Path.home() / ".cache" / "atelier" / "models")
        ),
    )


def bare_tiny_sdxl(models_dir: str) -> Any:
    """A bare loop's ``StableDiffusionXLPipeline`` of tiny-sdxl on the CPU, on one torch
    thread, loaded from the folder the worker loads (built there when missing)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from worker.builtin.tiny import ensure_tiny_sdxl

    torch.set_num_threads(1)
    path = ensure_tiny_sdxl(Path(models_dir) / "tiny-sdxl")
    return StableDiffusionXLPipeline.from_pretrained(str(path), use_safetensors=True).to("cpu")


def serve_reference(run: Callable[..., None], unit: str) -> None:
    """The child's side of :class:`Reference`, once loaded and warmed: says it is ready,
    then for each line of integers on stdin calls ``run(*them)`` and answers with a JSON
    line, ``{unit: the first, "seconds": ...}``."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        values = [int(x) for x in line.split()]
        t0 = time.perf_counter()
        run(*values)
        print(json.dumps({unit: values[0], "seconds": time.perf_counter() - t0}), flush=True)
