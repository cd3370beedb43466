"""Logging for every atelier process (API, worker, dispatcher), configured in one place.

``ATELIER_LOG_FORMAT=text`` (the default) writes ``time level logger message`` lines;
``json`` writes one JSON object per line::

    {"ts": "2026-11-22T03:40:00.123Z", "level": "INFO", "logger": "worker.run",
     "message": "job 0f3c… succeeded", "job_id": "0f3c…"}

``job_id`` is on every line logged while a job runs: code that handles a job runs
inside :func:`job_context` (a context variable, so each thread and task has its own),
Celery's task lines (``Task atelier.generate[<id>] received``, ``succeeded``…) take
it from the task id, which is the job id, and the API's access lines from a job's
path. A record given ``extra={"job_id": …}`` keeps its own. ``exc`` holds the formatted
traceback when there is one.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from producer.core import keys as K

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: A job's routes in the HTTP API (``/v1/jobs/{id}``, ``/v1/jobs/{id}/events``…).
_JOB_PATH = re.compile(r"/v1/jobs/([0-9A-Za-z_-]{1,64})(?:[/?]|$)")

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("atelier_job_id", default=None)


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Every line logged in this block (this thread or task) carries ``job_id``."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def current_job_id() -> str | None:
    return _job_id.get()


class JobIdFilter(logging.Filter):
    """Sets ``record.job_id`` when known (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            job_id = _job_id.get()
            if job_id is None:
                # Celery's worker and tracer pass the task's context as ``extra={"data":
                # {...}}``; atelier sends each job with the job id as the task id.
                data = getattr(record, "data", None)
                if isinstance(data, dict) and data.get("name") == K.TASK_GENERATE:
                    job_id = data.get("id")
                elif record.name == "uvicorn.access":
                    job_id = _access_job_id(record)
            record.job_id = job_id
        return True


def _access_job_id(record: logging.LogRecord) -> str | None:
    # uvicorn's access line: (client, method, path, http version, status).
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
        match = _JOB_PATH.match(args[2])
        if match:
            return match.group(1)
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            line["job_id"] = job_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(log_format: str = "text", level: str | int = "INFO") -> logging.Handler:
    """Send every logger's records to stderr in ``log_format``; returns the handler.

    Replaces the root logger's handlers, so calling it again (tests, a CLI that runs a
    process in-line) does not double lines. Python warnings go through logging too, so
    a JSON log holds nothing but JSON lines.
    """
    if log_format not in {"text", "json"}:
        raise ValueError("ATELIER_LOG_FORMAT must be text or json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(JobIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    return handler


__all__ = ["JobIdFilter", "JsonFormatter", "configure", "current_job_id", "job_context"]
