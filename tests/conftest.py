"""Fixtures with real parts: redis-server, moto's S3 server, worker subprocesses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.settings import Settings
from tests.servers import AWS_ENV, RedisServer, S3Server, Worker

BUCKET = "atelier-test"

# An extra registry entry no worker serves: its jobs stay queued (cancel, expiry).
MODELS_TOML = """
[models."tiny-idle"]
pipeline = "sdxl"
source = "builtin:tiny-sdxl"
dtype = "fp32"
scheduler = "euler"
schedulers = ["euler", "ddim"]
steps = 4
guidance_scale = 5.0
width = 64
height = 64
max_side = 512
max_pixels = 262144
"""


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("atelier")


@pytest.fixture(scope="session")
def models_file(session_dir: Path) -> str:
    path = session_dir / "models.toml"
    path.write_text(MODELS_TOML)
    return str(path)


@pytest.fixture(scope="session")
def models_dir(session_dir: Path) -> Path:
    """tiny-sdxl, built once per session (the worker would build it too)."""
    from worker.tiny import ensure_tiny_sdxl

    root = session_dir / "models"
    ensure_tiny_sdxl(root / "tiny-sdxl")
    return root


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(session_dir / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    for k, v in AWS_ENV.items():
        os.environ.setdefault(k, v)
    server = S3Server().start()
    import boto3

    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def settings_env(**values: Any) -> dict[str, str]:
    """Settings as ATELIER_* environment variables (for subprocesses)."""
    return {f"ATELIER_{k.upper()}": str(v) for k, v in values.items() if v is not None}


class Stack:
    """Redis + S3 + one tiny-sdxl worker, and the settings that reach them."""

    def __init__(self, values: dict[str, Any], worker: Worker | None) -> None:
        self.values = values
        self.settings = Settings(**values)
        self.worker = worker

    def client(self) -> Any:
        from producer import Client

        return Client(self.settings)


def stack_values(redis_url: str, models_dir: Path, models_file: str, storage_url: str,
                 s3_endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "storage_url": storage_url,
        "s3_endpoint_url": s3_endpoint,
        "models_dir": str(models_dir),
        "models_file": models_file,
        "default_model": "tiny-sdxl",
        "device": "cpu",
        "torch_threads": 1,
        "job_timeout_s": 60,
        "max_attempts": 2,
        "progress_interval_s": 0.1,
        "storage_retry_s": 5,
        "restore_interval_s": 1,
        "allow_http": "true",
        "egress_allowlist": "127.0.0.1",
    }
    values.update(extra)
    return values


def worker_env(values: dict[str, Any]) -> dict[str, str]:
    env = {**os.environ, **AWS_ENV, **settings_env(**values)}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def stack(session_dir: Path, redis_server: RedisServer, s3_server: S3Server, models_dir: Path,
          models_file: str) -> Iterator[Stack]:
    """The shared stack: S3 storage and one worker holding two jobs at a time."""
    values = stack_values(redis_server.url, models_dir, models_file, f"s3://{BUCKET}/outputs",
                          s3_server.endpoint)
    worker = Worker(worker_env(values), session_dir / "logs" / "worker.log", ["tiny-sdxl"])
    worker.start()
    yield Stack(values, worker)
    worker.stop()
