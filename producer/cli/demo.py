"""``atelier demo``: one job on the embedded stack (:mod:`producer.cli.embedded`): a private
redis-server and a worker, stopped whatever happens."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from producer.cli.common import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    download_outputs,
    follow_with_progress,
    need_worker_extra,
    request_from_args,
)
from producer.cli.embedded import EmbeddedStack
from producer.client import Client
from producer.core.contract import Status
from producer.core.settings import Settings


def run_demo(args: argparse.Namespace) -> int:
    """One job end to end; returns the CLI's exit code."""
    from rich.console import Console

    need_worker_extra()
    console = Console(stderr=True)
    with EmbeddedStack(
        args.model, args.device, "atelier-demo-", ATELIER_PROGRESS_INTERVAL_S="0.1"
    ) as stack:
        with console.status(f"starting a worker with {args.model} (built on first use)"):
            stack.start_worker()
        return _one_job(args, stack.settings, console)


def _one_job(args: argparse.Namespace, settings: Settings, console: Any) -> int:
    with Client(settings) as client:
        job_id = client.submit(request_from_args(args))
        record = follow_with_progress(client, job_id, timeout=600)
    if record["status"] != Status.SUCCEEDED:
        console.print(f"job {job_id} ended {record['status']}: {record.get('error')}")
        return EXIT_JOB_FAILED
    paths = download_outputs(settings, record, Path(args.out).resolve())
    t = record["timings"]
    console.print(
        f"job {job_id}: inference {t['inference_ms']} ms, encode "
        f"{t['encode_ms']} ms, upload {t['upload_ms']} ms"
    )
    for p in paths:
        print(p)
    return EXIT_OK
