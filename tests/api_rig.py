"""What the HTTP API tests share: their API keys (one admin, one given as its SHA-256),
the environment of an ``atelier api`` process that takes them, and counting the jobs in
Redis."""

from __future__ import annotations

import hashlib
from typing import Any

import redis

from producer.core import keys as K
from tests.helpers import Stack, worker_env

KEY_A, KEY_B, KEY_C = "key-a-0123456789", "key-b-0123456789", "key-c-0123456789"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
C = {"Authorization": f"Bearer {KEY_C}"}
PROMPT = "a lighthouse at dusk"


def api_env(stack: Stack, **extra: Any) -> dict[str, str]:
    values = {
        **stack.values,
        "api_keys": f"{KEY_A},{KEY_B},sha256:{hashlib.sha256(KEY_C.encode()).hexdigest()}",
        "admin_api_keys": KEY_A,
        "rate_limit_per_s": 0,
        "max_body_bytes": 65536,
        "sse_heartbeat_s": 0.5,
        **extra,
    }
    return worker_env(values)


def job_count(r: redis.Redis) -> int:
    return sum(1 for _ in r.scan_iter(K.JOB + "*", count=1000))
