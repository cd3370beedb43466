"""Log formats and the job id on log records (the processes' JSON logs are checked in
test_metrics.py); the settings that choose them."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest
from pydantic import ValidationError

from producer.core import keys as K
from producer.core.logs import JobIdFilter, JsonFormatter, job_context
from producer.core.settings import Settings
from worker.metrics import BusyClock


def logger_to(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(JobIdFilter())
    logger = logging.getLogger(f"atelier.test.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_json_lines_carry_the_job_id_of_their_context_only() -> None:
    out = io.StringIO()
    log = logger_to(out)
    log.info("before")
    with job_context("job-a"):
        log.info("inside %s", "a")
        seen = []

        def elsewhere() -> None:
            log.info("elsewhere")
            seen.append(1)

        # Another thread has its own context: no job id leaks into it.
        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        log.info("explicit", extra={"job_id": "job-b"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["message"] for d in lines] == [
        "before",
        "inside a",
        "elsewhere",
        "explicit",
        "failed",
    ]
    assert [d.get("job_id") for d in lines] == [None, "job-a", None, "job-b", None]
    assert lines[1]["level"] == "INFO" and lines[1]["ts"].endswith("Z")
    assert "ValueError: boom" in lines[4]["exc"]


def test_celery_task_lines_take_the_job_id_from_the_task() -> None:
    out = io.StringIO()
    log = logger_to(out)
    # As Celery's worker logs them: the task context as ``extra={"data": ...}``.
    context = {"id": "job-c", "name": K.TASK_GENERATE}
    log.info("Task %(name)s[%(id)s] received", context, extra={"data": context})
    other = {"id": "t-1", "name": "some.other.task"}
    log.info("Task %(name)s[%(id)s] received", other, extra={"data": other})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["job_id"] == "job-c" and first["message"].endswith("[job-c] received")
    assert "job_id" not in second


@pytest.mark.parametrize(
    "name,value",
    [("log_format", "yaml"), ("metrics_port", "70000"), ("gil_switch_interval_ms", "0")],
)
def test_bad_operations_settings_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"ATELIER_{name.upper()}", value)
    with pytest.raises(ValidationError, match=name):
        Settings()


def test_log_format_error_names_the_environment_variable() -> None:
    with pytest.raises(ValidationError, match="ATELIER_LOG_FORMAT must be one of text, json"):
        Settings(log_format="xml")


def test_log_level_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_LOG_LEVEL", "debug")
    assert Settings().log_level == "DEBUG"
    with pytest.raises(ValidationError, match="ATELIER_LOG_LEVEL must be one of DEBUG"):
        Settings(log_level="loud")


def test_busy_clock_counts_holds_and_the_one_in_progress() -> None:
    clock = BusyClock(window_s=60)
    assert clock.total() == 0 and clock.ratio() == 0
    clock.begin()
    ev = threading.Event()
    ev.wait(0.02)
    running = clock.total()
    assert running > 0  # a hold in progress counts already
    clock.end()
    held = clock.total()
    assert held >= running
    assert 0 < clock.ratio() <= 1
    clock.end()  # an unmatched end changes nothing
    assert clock.total() == held
