"""Intake (producer/jobs/intake.py), the one write path of a new job: the Python client
and the HTTP API write the same records through it, the message goes out before the
record, and an ``Idempotency-Key`` and admission are honoured there. Against a real
redis-server (broker and store) and a real ``atelier api``; no worker serves the model
used here, so records stay as intake wrote them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producer import Client, Unavailable
from producer.api.keys import key_id
from producer.core import keys as K
from producer.core.contract import Kind
from producer.core.errors import IdempotencyConflict
from producer.core.settings import Settings
from producer.jobs.broker import make_celery, queue_depth
from producer.jobs.idempotency import IdempotencyKey
from producer.jobs.intake import Admission, Intake, QueueFull
from producer.jobs.store import JobStore
from tests.helpers import data_uri, png, settings_env
from tests.records import request_of
from tests.servers import RedisServer, api_process, free_port

#: A database no other test file uses; emptied around each test.
DB = 15
KEY = "key-intake-0123456789"
MODEL = "tiny-idle"  # no worker serves it: jobs stay queued


GENERATION = {
    "prompt": "a lighthouse at dusk",
    "model": MODEL,
    "seed": 7,
    "image": data_uri(png((0, 0, 128))),
    "metadata": {"order": 42},
}
TRAINING = {
    "model": MODEL,
    "images": [data_uri(png((0, 128, 128)))],
    "instance_prompt": "a photo of sks lighthouse",
    "steps": 10,
    "seed": 3,
}


@pytest.fixture
def settings(redis_server: RedisServer, models_file: str) -> Iterator[Settings]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    yield Settings(redis_url=url, models_file=models_file, default_model=MODEL)
    r.flushdb()
    r.close()


@pytest.fixture
def r(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


@pytest.fixture
def api(settings: Settings, session_dir: Path) -> Iterator[httpx.Client]:
    env = {
        **os.environ,  # PYTHONPATH: the subprocess runs this checkout's code
        **settings_env(
            redis_url=settings.redis_url,
            models_file=settings.models_file,
            default_model=MODEL,
            api_keys=KEY,
            rate_limit_per_s=0,
        ),
    }
    proc = api_process(env, session_dir / "logs" / "api-intake.log").start()
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{proc.port}",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        ) as http:
            yield http
    finally:
        proc.stop()


def job_keys(r: redis.Redis) -> list[bytes]:
    return list(r.scan_iter(K.JOB + "*", count=1000))


def comparable(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record less what differs between two submissions of one request."""
    return {k: v for k, v in record.items() if k not in ("id", "created_at", "owner")}


def test_the_api_and_the_client_write_the_same_records(
    api: httpx.Client, client: Client, r: redis.Redis
) -> None:
    for route, body, submit, kind in (
        ("/v1/jobs", GENERATION, client.submit, Kind.GENERATE),
        ("/v1/trainings", TRAINING, client.train, Kind.TRAIN),
    ):
        res = api.post(route, json=body)
        assert res.status_code == 202, res.text
        by_api = client.get(res.json()["id"])
        by_client = client.get(submit(dict(body)))
        assert comparable(by_api) == comparable(by_client)
        assert by_api["kind"] == kind and by_api["status"] == "queued"
        assert by_api["owner"] == key_id(hashlib.sha256(KEY.encode()).hexdigest())
        assert by_client["owner"] is None
        # Both stashed the inline image beside the record, by its sha256: one blob.
        request = request_of(by_api)
        stashed = request["image"] if kind is Kind.GENERATE else request["images"][0]
        assert stashed.startswith("sha256:")
        # Both published one message on the kind's lane.
        assert queue_depth(r, K.lane(MODEL, kind)) == 2


def test_the_client_submits_and_trains_through_intake(client: Client) -> None:
    seen: list[tuple[Kind, str]] = []
    take = client.intake.take

    def spy(request: Any, kind: Kind, **kw: Any) -> Any:
        out = take(request, kind, **kw)
        seen.append((kind, out.job_id))
        return out

    client.intake.take = spy  # type: ignore[method-assign]
    job = client.submit(dict(GENERATION))
    training = client.train(dict(TRAINING))
    assert seen == [(Kind.GENERATE, job), (Kind.TRAIN, training)]


def test_the_message_goes_out_before_the_record(client: Client, r: redis.Redis) -> None:
    lane = K.lane(MODEL, Kind.GENERATE)
    depths: list[int] = []
    create = client.store.create

    def watched(record: Any, claim: Any = None) -> Any:
        depths.append(queue_depth(r, lane))  # what the broker holds as the record is written
        return create(record, claim)

    client.store.create = watched  # type: ignore[method-assign]
    client.submit(dict(GENERATION))
    assert depths == [1]


def test_a_publish_failure_leaves_no_record_and_the_key_free(
    settings: Settings, r: redis.Redis
) -> None:
    dead = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    store = JobStore.from_url(settings.redis_url, settings.result_ttl_s)
    celery = make_celery(dead, "atelier-test")
    celery.conf.broker_connection_timeout = 1
    celery.conf.task_publish_retry_policy = {
        "max_retries": 1,
        "interval_start": 0,
        "interval_step": 0.1,
    }
    with Client(settings) as client:
        normalized = client.normalize(dict(GENERATION), Kind.GENERATE)
    key = IdempotencyKey.of(None, "order-42", GENERATION)
    with pytest.raises(Unavailable, match="broker unavailable"):
        Intake(store, celery, dead).take(normalized, Kind.GENERATE, key=key)
    assert job_keys(r) == []
    assert r.get(key.key) is None
    celery.close()
    # The retry, with a broker, creates the job: the key was left free.
    with Client(settings) as client:
        taken = client.intake.take(normalized, Kind.GENERATE, key=key)
        assert taken.replay is None and client.get(taken.job_id)["status"] == "queued"
    store.redis.close()


def test_a_key_replays_its_job_and_refuses_another_body(client: Client, r: redis.Redis) -> None:
    normalized = client.normalize(dict(GENERATION), Kind.GENERATE)
    key = IdempotencyKey.of("key_x", "order-7", GENERATION)
    first = client.intake.take(normalized, Kind.GENERATE, owner="key_x", key=key)
    again = client.intake.take(normalized, Kind.GENERATE, owner="key_x", key=key)
    assert first.replay is None
    assert again.replay is not None and again.job_id == again.replay["id"] == first.job_id
    assert len(job_keys(r)) == 1
    assert queue_depth(r, K.lane(MODEL, Kind.GENERATE)) == 1  # the replay sent nothing
    other = IdempotencyKey.of("key_x", "order-7", {**GENERATION, "seed": 8})
    with pytest.raises(IdempotencyConflict):
        client.intake.take(normalized, Kind.GENERATE, owner="key_x", key=other)


def test_admission_refuses_a_full_lane_and_writes_nothing(client: Client, r: redis.Redis) -> None:
    normalized = client.normalize(dict(GENERATION), Kind.GENERATE)
    admission = Admission(r, limit=1)
    client.intake.take(normalized, Kind.GENERATE, admission=admission)
    with pytest.raises(QueueFull, match="holds 1 jobs") as refused:
        client.intake.take(normalized, Kind.GENERATE, admission=admission)
    assert refused.value.code == "queue_full"
    assert len(job_keys(r)) == 1
    # Another lane (a training of the same model) is admitted on its own depth.
    training = client.normalize(dict(TRAINING), Kind.TRAIN)
    client.intake.take(training, Kind.TRAIN, admission=admission)
    # limit 0: no admission control.
    client.intake.take(normalized, Kind.GENERATE, admission=Admission(r, limit=0))
    assert len(job_keys(r)) == 3
