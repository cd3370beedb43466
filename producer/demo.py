"""``atelier demo``: everything in one process tree, a private redis-server, a worker and
one job, stopped whatever happens (Ctrl-C, SIGTERM, SIGHUP, or the parent dying)."""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from producer.cli import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    _need_worker_extra,
    _request_from_args,
    download_outputs,
    follow_with_progress,
)
from producer.client import Client
from producer.contract import Status
from producer.settings import Settings, child_env, get_settings

#: How long the worker may take to build (tiny models) or download and warm up (real ones).
WORKER_START_S = 600


def run_demo(args: argparse.Namespace) -> int:
    """One job end to end; returns the CLI's exit code."""
    from rich.console import Console

    _need_worker_extra()
    # SIGTERM and SIGHUP unwind through the finally block below, like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    redis_bin = shutil.which("redis-server")
    if not redis_bin:
        raise SystemExit("atelier demo needs redis-server on PATH (apt-get install redis-server)")
    console = Console(stderr=True)
    tmp = Path(tempfile.mkdtemp(prefix="atelier-demo-"))
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        ))
        env: dict[str, Any] = child_env(
            ATELIER_REDIS_URL=f"redis://127.0.0.1:{port}/0",
            ATELIER_BROKER_URL=f"redis://127.0.0.1:{port}/0",
            ATELIER_STORAGE_URL=f"file://{tmp / 'store'}",
            ATELIER_DEFAULT_MODEL=args.model,
            ATELIER_DEVICE=args.device or get_settings().device,
            ATELIER_PROGRESS_INTERVAL_S="0.1",
        )
        with console.status(f"starting a worker with {args.model} (built on first use)"):
            _start_worker(args.model, env, tmp / "worker.log", console, procs)
        settings = Settings(**{k.removeprefix("ATELIER_").lower(): v for k, v in env.items()
                               if k.startswith("ATELIER_")})
        return _one_job(args, settings, console)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _start_worker(model: str, env: dict[str, Any], log_path: Path, console: Any,
                  procs: list[subprocess.Popen[bytes]]) -> None:
    """Start a worker subprocess (listed in ``procs`` at once, for the caller to stop) and
    return once it says it is ready (it has warmed up)."""
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--model", model],
                                  env=env, stdout=log, stderr=subprocess.STDOUT,
                                  preexec_fn=_die_with_parent)
    procs.append(worker)
    deadline = time.monotonic() + WORKER_START_S
    while b"atelier worker ready" not in log_path.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            console.print(log_path.read_text()[-3000:])
            raise SystemExit("atelier demo: the worker did not start")
        time.sleep(0.2)


def _one_job(args: argparse.Namespace, settings: Settings, console: Any) -> int:
    with Client(settings) as client:
        job_id = client.submit(_request_from_args(args))
        record = follow_with_progress(client, job_id, timeout=600)
    if record["status"] != Status.SUCCEEDED:
        console.print(f"job {job_id} ended {record['status']}: {record.get('error')}")
        return EXIT_JOB_FAILED
    paths = download_outputs(settings, record, Path(args.out).resolve())
    t = record["timings"]
    console.print(f"job {job_id}: inference {t['inference_ms']} ms, encode "
                  f"{t['encode_ms']} ms, upload {t['upload_ms']} ms")
    for p in paths:
        print(p)
    return EXIT_OK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the finally block still cleans up
        pass


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
