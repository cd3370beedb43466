"""JobStore.claimed: an Idempotency-Key read back, against a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer.core.errors import IdempotencyConflict
from producer.jobs.idempotency import IdempotencyKey
from producer.jobs.store import JobStore, Verdict

#: A database no other test file uses; emptied around each test.
DB = 10

REQUEST = {"prompt": "a lighthouse", "model": "m", "priority": 5}


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    s = JobStore(redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{DB}"))
    s.redis.flushdb()
    yield s
    s.redis.flushdb()
    s.redis.close()


def doc(job_id: str, owner: str) -> Any:
    return {
        "id": job_id,
        "status": "queued",
        "owner": owner,
        "request": REQUEST,
        "created_at": "2026-12-01T00:00:00.000Z",
        "metadata": {},
    }


def test_the_key_names_its_job_for_the_same_body_only(store: JobStore) -> None:
    key = IdempotencyKey.of("key_a", "order-42", {"prompt": "x", "seed": 1})
    assert store.claimed(key) is None
    assert store.create(doc("j1", "key_a"), key.claim("j1", 60)).ok
    # Key order in the body does not matter; the owner does.
    again = IdempotencyKey.of("key_a", "order-42", {"seed": 1, "prompt": "x"})
    named = store.claimed(again)
    assert named is not None and named["id"] == "j1"
    assert store.claimed(IdempotencyKey.of("key_b", "order-42", {"prompt": "x", "seed": 1})) is None
    with pytest.raises(IdempotencyConflict):
        store.claimed(IdempotencyKey.of("key_a", "order-42", {"prompt": "x", "seed": 2}))
    # A second create with the key is refused.
    assert store.create(doc("j2", "key_a"), again.claim("j2", 60)).detail is Verdict.CLAIMED


def test_a_key_whose_record_expired_is_released(store: JobStore) -> None:
    key = IdempotencyKey.of("key_a", "order-7", {"prompt": "x"})
    store.create(doc("j1", "key_a"), key.claim("j1", 60))
    store.redis.delete("atelier:job:j1")  # the record's TTL ran out before the key's
    assert store.claimed(key) is None
    assert not store.redis.exists(key.key)
