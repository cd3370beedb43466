"""Fixtures with real parts: redis-server, moto's S3 server, worker subprocesses, the API
process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, Settings
from producer.client import new_job_id
from producer.core.contract import new_record, now_iso
from producer.core.registry import Registry
from producer.jobs.store import JobStore
from producer.requests.generate import validate_request
from tests.helpers import BUCKET, MODELS_TOML, Stack, stack_values, worker_env
from tests.records import RESULT_TTL_S
from tests.servers import AWS_ENV, Process, RedisServer, S3Server, Worker, api_process


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the tiny models (``models_dir``: built once per session, then
    loaded, seconds either way) is ``slow`` too, like one that starts a worker."""
    for item in items:
        if "models_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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
    from worker.builtin.tiny import ensure_tiny_sdxl

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


@pytest.fixture(scope="session")
def stack(
    session_dir: Path,
    redis_server: RedisServer,
    s3_server: S3Server,
    models_dir: Path,
    models_file: str,
) -> Iterator[Stack]:
    """The shared stack: S3 storage and one worker holding two jobs at a time."""
    values = stack_values(
        redis_server.url, models_dir, models_file, f"s3://{BUCKET}/outputs", s3_server.endpoint
    )
    worker = Worker(worker_env(values), session_dir / "logs" / "worker.log", ["tiny-sdxl"])
    worker.start()
    yield Stack(values, worker)
    worker.stop()


@pytest.fixture(scope="module")
def api_server(
    api_server_env: dict[str, str], session_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Process]:
    """``atelier api`` (uvicorn) as a process, one per test module, on the environment
    that module's ``api_server_env`` fixture gives (each module using this defines one);
    stopped by its pid once the module's tests are done. Its log is
    ``logs/api-<module>.log`` in the session's folder."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    proc = api_process(api_server_env, session_dir / "logs" / f"api-{module}.log").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def bare_pipe(models_dir: Any) -> Any:
    """tiny-sdxl in this process, through diffusers alone."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(models_dir / "tiny-sdxl"), use_safetensors=True
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# A module with a Redis database of its own names it ``DB = N`` at its top; these
# fixtures work in that database (the number each module flushes is its alone).


@pytest.fixture
def db_url(redis_url: str, request: pytest.FixtureRequest) -> str:
    """The URL of the test module's own Redis database, the one its ``DB`` names."""
    return redis_url.rsplit("/", 1)[0] + f"/{request.module.DB}"


@pytest.fixture
def rdb(db_url: str) -> Iterator[redis.Redis]:
    """The module's database, emptied before and after the test."""
    r = redis.Redis.from_url(db_url)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


@pytest.fixture
def make_settings(db_url: str, models_file: str, tmp_path: Path) -> Any:
    """``make_settings(**overrides)``: Settings on the module's database and the session's
    registry, with ``overrides``."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": db_url,
            "default_model": "tiny-sdxl",
            "models_file": models_file,
            "models_dir": str(tmp_path),
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def client(make_settings: Any) -> Iterator[Client]:
    """A Client on the module's database (it is not emptied: ``rdb`` does that)."""
    c = Client(make_settings())
    yield c
    c.close()


@pytest.fixture
def store(db_url: str) -> Iterator[JobStore]:
    """A JobStore on the module's database, emptied before and after the test; finished
    records keep ``RESULT_TTL_S``."""
    s = JobStore(redis.Redis.from_url(db_url), result_ttl_s=RESULT_TTL_S)
    s.redis.flushdb()
    yield s
    s.redis.flushdb()
    s.redis.close()


@pytest.fixture
def make_doc(make_settings: Any, models_file: str) -> Any:
    """``make_doc(created_at=None, **fields)``: a new queued record of a validated request
    (a lighthouse at dusk, with ``fields``)."""
    settings = make_settings()
    registry = Registry.load(models_file)

    def make(created_at: str | None = None, **fields: Any) -> Any:
        req = validate_request({"prompt": "a lighthouse at dusk", **fields}, registry, settings)
        return new_record(new_job_id(), req, created_at or now_iso())

    return make


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread in this process for the module's tests (as each worker has)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
