"""What the ``atelier`` commands share: exit codes, the request options, the progress bar,
the download of a job's outputs and the check for the worker extra (:mod:`producer.cli.main`,
``demo`` and ``studio`` import them from here, so none of them imports another)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from producer.client import Client
from producer.core.contract import EXTENSIONS, EventType, Record
from producer.core.normalized import GenerateRequest
from producer.core.settings import Settings
from producer.core.storage import storage_from_settings

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND = 0, 1, 2, 3, 4


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def follow_with_progress(
    client: Client, job_id: str, quiet: bool = False, timeout: float | None = None
) -> Record:
    """Show a progress bar fed by the job's events; return the final record."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, quiet=quiet)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("queued", total=None)
        for ev in client.events(job_id, timeout=timeout):
            kind = EventType(ev["type"])
            if kind is EventType.STARTED:
                bar.update(task, description="generating")
            elif kind is EventType.PROGRESS:
                data = ev["data"]
                if "phase" in data:  # a training: its phase and loss
                    loss = f" loss {data['loss']:.4f}" if data.get("loss") is not None else ""
                    bar.update(task, description=f"{data['phase']}{loss}")
                bar.update(task, completed=data["step"], total=data["total"])
            elif kind is EventType.OUTPUT:
                bar.update(task, description="uploading")
            elif kind is EventType.RETRYING:
                bar.update(task, description=f"retrying (attempt {ev['data']['attempt']})")
            elif kind in (
                EventType.SUCCEEDED,
                EventType.FAILED,
                EventType.CANCELLED,
                EventType.EXPIRED,
            ):
                total = bar.tasks[0].total or 1
                if kind is EventType.SUCCEEDED:
                    bar.update(task, completed=total, total=total)
                bar.update(task, description=kind.value.removeprefix("job."))
    return client.get(job_id)


def download_outputs(settings: Settings, record: Record, out_dir: Path) -> list[Path]:
    storage = storage_from_settings(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    ext = EXTENSIONS[cast(GenerateRequest, record["request"])["output_format"]]
    for output in record["outputs"]:
        key = output["key"]
        if output.get("withheld") or key is None:  # the safety checker's: nothing stored
            continue
        path = out_dir / f"{record['id']}-{output['index']}.{ext}"
        path.write_bytes(storage.get(key))
        paths.append(path)
    return paths


#: Request fields the CLI takes as options: name → argparse keywords.
REQUEST_OPTIONS: dict[str, dict[str, Any]] = {
    "model": {},
    "negative_prompt": {},
    "width": {"type": int},
    "height": {"type": int},
    "steps": {"type": int},
    "guidance_scale": {"type": float},
    "scheduler": {},
    "seed": {"type": int},
    "num_images": {"type": int},
    "output_format": {"choices": ["png", "webp", "jpeg"]},
    "priority": {"type": int},
}


def add_request_args(p: argparse.ArgumentParser, names: Iterable[str] = REQUEST_OPTIONS) -> None:
    p.add_argument("prompt")
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), dest=name, **REQUEST_OPTIONS[name])


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    req: dict[str, Any] = {"prompt": args.prompt}
    for name in REQUEST_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            req[name] = value
    return req


def need_worker_extra() -> None:
    """Exit with the install line when the worker extra (torch, diffusers) is absent."""
    missing = [m for m in ("worker", "torch", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"atelier: the worker needs {', '.join(missing)}: pip install 'atelier[worker]'"
        )
