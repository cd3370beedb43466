"""The fault-injection suite's fixtures: a private redis-server (AOF everysec,
noeviction) per test, and the rig (tests/helpers.py: ``Rig``) holding the processes a
test starts (workers, API replicas, dispatchers), all stopped by their own pids when
the test ends, whatever happened.

Each test owns its Redis, so the global event stream holds only its own jobs' events
and every count the suite checks is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Rig
from tests.servers import RedisServer


@pytest.fixture
def rig(tmp_path: Path, models_dir: Path) -> Iterator[Rig]:
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    r = Rig(tmp_path, redis, models_dir)
    try:
        yield r
    finally:
        r.close()
        redis.stop()


@pytest.fixture
def two_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """The broker and the job store as two redis-servers (the store with its AOF)."""
    broker = RedisServer(tmp_path / "broker").start()
    store = RedisServer(tmp_path / "store", appendonly=True).start()
    yield broker, store
    store.stop()
    broker.stop()
