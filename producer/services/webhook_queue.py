"""The webhook dispatchers' work in Redis: the global event stream read through their
consumer group, and the sorted set of deliveries waiting for a retry.

Every Redis write of the dispatcher goes through here (or through the store: the
delivery log, :meth:`producer.jobs.store.JobStore.record_delivery`), as every job write goes
through the store. A retry is named ``{job_id}/{event_id}`` and scored by when it is
due (ms); while a dispatcher runs it, its score is pushed ahead (its lease).
"""

from __future__ import annotations

from typing import Any

import redis

from producer.core import keys as K
from producer.core.contract import Event
from producer.jobs import scripts as S
from producer.jobs.eventlog import decode_event


def retry_member(job_id: str, event_id: str) -> str:
    return f"{job_id}/{event_id}"


class WebhookQueue:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim_retries = client.register_script(S.CLAIM_RETRIES)

    def ensure_group(self) -> None:
        # From the start of the stream: events written before the first dispatcher ran
        # are delivered too (the group is created once, normally at deployment).
        try:
            self.redis.xgroup_create(K.GLOBAL_EVENTS, K.DISPATCH_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_new(self, consumer: str, count: int, block_ms: int) -> list[Event]:
        """Events no dispatcher has taken yet, waiting up to ``block_ms`` for one."""
        res: Any = self.redis.xreadgroup(
            K.DISPATCH_GROUP, consumer, {K.GLOBAL_EVENTS: ">"}, count=count, block=block_ms
        )
        return [decode_event(eid, fields) for _, entries in res or [] for eid, fields in entries]

    def claim_abandoned(
        self, consumer: str, min_idle_ms: int, count: int
    ) -> tuple[list[Event], int]:
        """Events another dispatcher took and never acknowledged (it died), and how many
        entries were claimed: those trimmed from the stream meanwhile are acknowledged
        here (nothing to send)."""
        res: Any = self.redis.xautoclaim(
            K.GLOBAL_EVENTS,
            K.DISPATCH_GROUP,
            consumer,
            min_idle_time=min_idle_ms,
            start_id="0-0",
            count=count,
        )
        entries = res[1] if res else []
        events: list[Event] = []
        for eid, fields in entries:
            if fields is None:
                self.ack(eid)
            else:
                events.append(decode_event(eid, fields))
        return events, len(entries)

    def ack(self, event_id: str | bytes) -> None:
        self.redis.xack(K.GLOBAL_EVENTS, K.DISPATCH_GROUP, event_id)

    def next_due_ms(self) -> int | None:
        """When the next retry is due (ms), if any waits."""
        nxt: Any = self.redis.zrange(K.WEBHOOK_RETRIES, 0, 0, withscores=True)
        return int(nxt[0][1]) if nxt else None

    def take_due(self, now_ms: int, lease_until_ms: int, limit: int) -> list[str]:
        """Up to ``limit`` retries due by ``now_ms``, each leased until ``lease_until_ms``."""
        members: Any = self._claim_retries(
            keys=[K.WEBHOOK_RETRIES], args=[now_ms, lease_until_ms, limit]
        )
        return [m.decode() if isinstance(m, bytes) else m for m in members]

    def retry_later(self, member: str, due_ms: int, ack: str | None = None) -> None:
        """Schedule ``member`` at ``due_ms``; with ``ack``, acknowledge that new event in
        the same transaction (never both lost nor both kept)."""
        if ack is None:
            self.redis.zadd(K.WEBHOOK_RETRIES, {member: due_ms})
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(K.WEBHOOK_RETRIES, {member: due_ms})
        pipe.xack(K.GLOBAL_EVENTS, K.DISPATCH_GROUP, ack)
        pipe.execute()

    def drop(self, member: str) -> None:
        """No more attempts at ``member``."""
        self.redis.zrem(K.WEBHOOK_RETRIES, member)
