"""The HTTP API's rate limit and admission control, each on API replicas of its own
(``atelier api`` under real uvicorn, driven by httpx); the rate limiter's script with a
fractional interval."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from producer.jobs.broker import queue_depth
from tests.api_rig import PROMPT, A, B, C, api_env, job_count
from tests.helpers import Stack
from tests.servers import Process, api_process

pytestmark = pytest.mark.slow


def test_rate_limit_is_shared_by_replicas(stack: Stack, session_dir: Path) -> None:
    env = api_env(stack, rate_limit_per_s=1, rate_limit_burst=3)
    procs: list[Process] = []
    try:
        for i in range(2):
            procs.append(api_process(env, session_dir / "logs" / f"api-rl{i}.log").start())
        one, two = (httpx.Client(base_url=f"http://127.0.0.1:{p.port}") for p in procs)
        statuses = [one.get("/v1/models", headers=B).status_code for _ in range(2)]
        statuses.append(two.get("/v1/models", headers=B).status_code)
        assert statuses == [200, 200, 200]
        res = two.get("/v1/models", headers=B)  # the burst is spent, on either replica
        assert res.status_code == 429, res.text
        assert int(res.headers["retry-after"]) >= 1
        assert res.json()["error"]["code"] == "rate_limited"
        assert one.get("/v1/models", headers=B).status_code == 429
        assert one.get("/v1/models", headers=C).status_code == 200  # per key
        time.sleep(1.2)  # a token comes back
        assert two.get("/v1/models", headers=B).status_code == 200
        one.close()
        two.close()
    finally:
        for p in procs:
            p.stop()


def test_admission_control_refuses_when_the_queue_is_full(stack: Stack, session_dir: Path) -> None:
    # Its own Redis database: tiny-idle's queue there starts empty.
    db_url = stack.settings.redis_url.rsplit("/", 1)[0] + "/7"
    r = redis.Redis.from_url(db_url)
    r.flushdb()
    env = api_env(stack, redis_url=db_url, max_queue_depth=2, admission_retry_after_s=7)
    proc = api_process(env, session_dir / "logs" / "api-adm.log").start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{proc.port}") as api:
            body = {"prompt": PROMPT, "model": "tiny-idle"}
            assert [api.post("/v1/jobs", headers=A, json=body).status_code for _ in range(2)] == [
                202,
                202,
            ]
            res = api.post("/v1/jobs", headers=A, json=body)
            assert res.status_code == 503 and res.headers["retry-after"] == "7"
            assert res.json()["error"]["code"] == "queue_full"
            assert queue_depth(r, "tiny-idle") == 2 and job_count(r) == 2
            # Another model's queue is not full.
            assert (
                api.post("/v1/jobs", headers=A, json={"prompt": PROMPT, "steps": 1}).status_code
                == 202
            )
    finally:
        proc.stop()
        r.flushdb()
        r.close()


def test_rate_limiter_with_a_fractional_interval(redis_url: str) -> None:
    from producer.jobs.scripts import RATE_LIMIT

    r = redis.Redis.from_url(redis_url)
    limiter = r.register_script(RATE_LIMIT)
    key = "atelier:ratelimit:test-fractional"
    r.delete(key)
    interval = 1000 / 3  # 3 per second: not a whole number of milliseconds
    assert [limiter(keys=[key], args=[interval, 2]) for _ in range(2)] == [0, 0]
    wait = limiter(keys=[key], args=[interval, 2])
    assert 0 < wait <= 334
    time.sleep(wait / 1000 + 0.05)
    assert limiter(keys=[key], args=[interval, 2]) == 0
    assert 0 < r.pttl(key) <= 2000
    r.delete(key)
    r.close()
