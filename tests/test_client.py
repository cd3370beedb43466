"""Client edges: an unreachable broker leaves nothing behind; the broker config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from producer import Client, Unavailable
from producer.core.settings import Settings
from producer.jobs.broker import celery_config, celery_priority
from tests.servers import ROOT, free_port


def test_unreachable_broker_leaves_no_record(redis_url: str, models_file: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = Settings(
        redis_url=redis_url.rsplit("/", 1)[0] + "/12",
        broker_url=dead,
        default_model="tiny-sdxl",
        models_file=models_file,
    )
    r = redis.Redis.from_url(settings.redis_url)
    r.flushdb()
    with Client(settings) as client:
        client.celery.conf.broker_connection_timeout = 1
        client.celery.conf.task_publish_retry_policy = {
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.1,
        }
        started = time.monotonic()
        with pytest.raises(Unavailable, match="broker unavailable"):
            client.submit(prompt="goes nowhere")
        assert time.monotonic() - started < 30
    assert r.keys("atelier:job:*") == []  # the record was removed again
    r.close()


def test_broker_config_is_json_only_and_at_least_once() -> None:
    settings = Settings(job_timeout_s=900, worker_concurrency=2, storage_retry_s=60)
    conf = celery_config(settings)
    assert conf["accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    vt = conf["broker_transport_options"]["visibility_timeout"]
    # the second held job may wait a whole job for the GPU, then run its own
    assert vt >= 2 * 900 + 60
    assert conf["broker_transport_options"]["priority_steps"] == list(range(10))
    # A worker killed mid-sweep holds the restore lock no longer than a sweep interval.
    assert conf["broker_transport_options"]["unacked_mutex_expire"] <= max(
        2, settings.restore_interval_s
    )
    assert celery_priority(9) == 0 and celery_priority(0) == 9  # Redis serves 0 first
    # Task events wait for a monitor to ask (Flower does), unless a deployment says so.
    assert conf["worker_send_task_events"] is False
    assert celery_config(Settings(task_events=True))["worker_send_task_events"] is True


def test_visibility_timeout_follows_every_setting_it_depends_on() -> None:
    small = Settings(worker_concurrency=1, job_timeout_s=600, storage_retry_s=10)
    big = Settings(worker_concurrency=8, job_timeout_s=600, storage_retry_s=60)
    # 17 uploads (a 16-image sweep and its sheet) and the manifest may each retry
    assert big.effective_visibility_timeout_s >= 8 * 600 + 18 * 60
    assert small.effective_visibility_timeout_s == 24 * 3600  # a day: leases act first
    assert Settings(visibility_timeout_s=5).effective_visibility_timeout_s == 5  # explicit


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=60,
    )


def test_cli_exit_codes(redis_url: str, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    res = run_cli("status", "nope", ATELIER_REDIS_URL=dead)
    assert res.returncode == 3 and "Redis unavailable" in res.stderr
    res = run_cli("status", "nope", ATELIER_REDIS_URL=redis_url)
    assert res.returncode == 4 and "no job" in res.stderr
    res = run_cli(
        "submit",
        "x",
        "--steps",
        "0",
        ATELIER_REDIS_URL=redis_url,
        ATELIER_DEFAULT_MODEL="tiny-sdxl",
    )
    assert res.returncode == 2 and "steps" in res.stderr
    res = run_cli("models", ATELIER_MODELS_FILE=str(tmp_path / "missing.toml"))
    assert res.returncode == 2 and "bad settings" in res.stderr
    res = run_cli("models", "--json")
    assert res.returncode == 0
    views = {m["name"]: m for m in json.loads(res.stdout)}
    assert "playground-v2.5" in views
    with Client(Settings()) as client:  # the client's list is the CLI's (no Redis read)
        assert client.models() == list(views.values())
    assert [lora["name"] for lora in views["tiny-sdxl"]["loras"]] == ["tiny-sdxl-lora"]
    # the text: each model's line, then what its requests may name, indented
    lines = run_cli("models").stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("tiny-sdxl "))
    block = lines[start + 1 : start + 4]
    assert block[0].startswith("  controlnets  ") and "tiny-sdxl-canny (canny)" in block[0]
    assert block[1:] == [
        "  references   modes full, subject, style",
        "  loras        tiny-sdxl-lora",
    ]


def test_cli_processes_refuse_to_start_without_their_secrets(redis_url: str) -> None:
    res = run_cli(
        "api", "--port", str(free_port()), ATELIER_REDIS_URL=redis_url, ATELIER_API_KEYS=""
    )
    assert res.returncode != 0 and "ATELIER_API_KEYS" in res.stderr
    res = run_cli("dispatcher", ATELIER_REDIS_URL=redis_url, ATELIER_WEBHOOK_SECRET="")
    assert res.returncode == 2 and "ATELIER_WEBHOOK_SECRET" in res.stderr
    res = run_cli("dispatcher", ATELIER_WEBHOOK_SECRET="not-whsec")
    assert res.returncode == 2 and "whsec_" in res.stderr
