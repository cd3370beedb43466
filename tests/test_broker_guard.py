"""worker/broker_guard: a restore kombu attempts through a closed broker connection (what
Celery's consumer does when Redis restarts with a message taken) no longer raises, so the
worker keeps running; the message stays in kombu's unacknowledged set for the reconciler.
Against a real redis-server and kombu's own Redis transport."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection

from producer.core import keys as K
from tests.servers import RedisServer
from worker import broker_guard


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path).start()
    yield s
    s.stop()


def taken_then_closed(url: str) -> tuple[Any, Connection]:
    """A message taken and not acknowledged, then its connection closed as Celery's
    consumer closes it on a connection error: the channel drops its pools (as its close
    does, before restoring) and the transport forgets its connection."""
    conn = Connection(url)
    queue = conn.SimpleQueue("guarded")
    queue.put({"job": 1})
    message = queue.get(timeout=5)
    message.channel._disconnect_pools()
    conn._do_close_transport()  # kombu's own step of Connection.close()
    return message, conn


def test_a_restore_through_a_closed_connection_is_skipped(server: RedisServer) -> None:
    from kombu.transport import redis as kombu_redis

    r = redis.Redis.from_url(server.url)
    message, _ = taken_then_closed(server.url)
    qos = message.channel.qos
    if not getattr(kombu_redis.QoS.restore_unacked, "atelier_guarded", False):
        # Unguarded, kombu raises: what stopped a worker at a Redis restart.
        with pytest.raises(AttributeError):
            qos.restore_unacked()
    broker_guard.install()
    broker_guard.install()  # twice is once
    assert qos.restore_unacked() is None
    message.reject(requeue=True)  # a task's Reject(requeue=True): restore_by_tag
    # Nothing lost: the message is still kombu's unacknowledged one, where the
    # reconciler looks for it.
    assert r.hlen(K.UNACKED) == 1
    assert r.llen("guarded") == 0
    r.close()


def test_other_errors_still_raise(server: RedisServer) -> None:
    broker_guard.install()
    conn = Connection(server.url)
    try:
        queue = conn.SimpleQueue("guarded")
        queue.put({"job": 2})
        message = queue.get(timeout=5)
        server.stop()  # the connection is open, Redis is gone: a connection error
        with pytest.raises(redis.ConnectionError):
            message.channel.qos.restore_by_tag(message.delivery_tag)
    finally:
        conn.release()
