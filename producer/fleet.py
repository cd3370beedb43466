"""What the fleet looks like from Redis: queue depths and live workers.

Shared by the HTTP API (``/v1/queues``, ``/v1/workers``) and the CLI.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from producer import constants as K
from producer.broker import queue_depth
from producer.contract import parse_iso
from producer.registry import Registry
from producer.store import JobStore


def queue_report(store: JobStore, broker: redis.Redis, registry: Registry) -> list[dict[str, Any]]:
    """Per model: messages in its queue, jobs still queued, and the oldest one's age."""
    out = []
    now = time.time()
    for spec in registry:
        queued, oldest = store.queued_summary(spec.name)
        out.append({
            "model": spec.name,
            "queue": K.queue_name(spec.name),
            "depth": queue_depth(broker, spec.name),
            "queued": queued,
            "oldest_queued_at": oldest,
            "oldest_age_s": round(now - parse_iso(oldest).timestamp(), 3) if oldest else None,
        })
    return out


def live_workers(r: redis.Redis) -> list[dict[str, Any]]:
    """Workers whose heartbeat has not expired; dead ones are pruned from the index."""
    ids: Any = r.zrange(K.WORKERS, 0, -1)
    if not ids:
        return []
    names = [i.decode() if isinstance(i, bytes) else i for i in ids]
    raws: Any = r.mget([K.worker_key(n) for n in names])
    alive, dead = [], []
    for name, raw in zip(names, raws, strict=True):
        (alive.append(json.loads(raw)) if raw else dead.append(name))
    if dead:
        r.zrem(K.WORKERS, *dead)
    return alive


