"""WebhookQueue and the store's reads for the dispatcher, against a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from producer.core import keys as K
from producer.services.webhook_queue import WebhookQueue, retry_member

#: A database no other test file uses; emptied around each test.
DB = 11


@pytest.fixture
def queue(redis_url: str) -> Iterator[WebhookQueue]:
    q = WebhookQueue(redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{DB}"))
    q.redis.flushdb()
    q.ensure_group()
    q.ensure_group()  # twice: the group exists, nothing to do
    yield q
    q.redis.flushdb()
    q.redis.close()


def add_event(q: WebhookQueue, job_id: str = "j1") -> str:
    eid = q.redis.xadd(
        K.GLOBAL_EVENTS, {"type": "job.succeeded", "job_id": job_id, "ts": "t", "data": "{}"}
    )
    assert isinstance(eid, bytes)
    return eid.decode()


def pending(q: WebhookQueue) -> int:
    return int(q.redis.xpending(K.GLOBAL_EVENTS, K.DISPATCH_GROUP)["pending"])


def test_a_retry_is_scheduled_and_the_event_acknowledged_together(queue: WebhookQueue) -> None:
    eid = add_event(queue)
    [event] = queue.read_new("d1", 10, 100)
    assert event["id"] == eid and event["data"] == {} and pending(queue) == 1
    member = retry_member("j1", eid)
    queue.retry_later(member, 5_000, ack=eid)
    assert pending(queue) == 0 and queue.next_due_ms() == 5_000
    assert queue.take_due(4_999, 9_000, 10) == []
    assert queue.take_due(5_000, 9_000, 10) == [member]
    assert queue.next_due_ms() == 9_000  # leased while it runs
    queue.drop(member)
    assert queue.next_due_ms() is None


def test_abandoned_events_are_claimed_and_trimmed_ones_acknowledged(
    queue: WebhookQueue,
) -> None:
    kept, trimmed = add_event(queue, "a"), add_event(queue, "b")
    assert len(queue.read_new("dead", 10, 100)) == 2
    queue.redis.xdel(K.GLOBAL_EVENTS, trimmed)
    events, claimed = queue.claim_abandoned("alive", 0, 10)
    # Redis 6.2 hands a trimmed entry back without fields (acknowledged here); Redis 7
    # drops it from the pending list itself.
    assert [e["id"] for e in events] == [kept] and claimed in (1, 2)
    assert pending(queue) == 1  # the trimmed one is gone, the kept one is ours
    queue.ack(kept)
    assert pending(queue) == 0
