"""What the fleet looks like from Redis: queue depths and live workers.

Shared by the HTTP API (``/v1/queues``, ``/v1/workers``) and the CLI. The worker
registry is written here too (:func:`beat`, :func:`retire`, by each worker's heartbeat),
so its keys have one reader and one writer, in one module.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from producer.core import keys as K
from producer.core.contract import Kind, parse_iso
from producer.core.registry import Registry
from producer.jobs.broker import queue_depth
from producer.jobs.store import JobStore


def queue_report(store: JobStore, broker: redis.Redis, registry: Registry) -> list[dict[str, Any]]:
    """Per model, then per model that trains (``kind: train``, queue
    ``atelier.train.<model>``): messages in its queue, jobs still queued, and the oldest
    one's age."""
    out = []
    now = time.time()
    for lane in registry.lanes():
        queued, oldest = store.queued_summary(lane)
        train = lane.startswith(K.TRAIN_LANE)
        out.append(
            {
                "model": lane.removeprefix(K.TRAIN_LANE) if train else lane,
                "kind": (Kind.TRAIN if train else Kind.GENERATE).value,
                "queue": K.queue_name(lane),
                "depth": queue_depth(broker, lane),
                "queued": queued,
                "oldest_queued_at": oldest,
                "oldest_age_s": round(now - parse_iso(oldest).timestamp(), 3) if oldest else None,
            }
        )
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


def beat(r: redis.Redis, worker_id: str, state: dict[str, Any], ttl_s: float) -> None:
    """Publish a worker's state; it expires after ``ttl_s`` unless beaten again, so a
    dead worker leaves ``/v1/workers`` by itself."""
    pipe = r.pipeline(transaction=False)
    pipe.set(K.worker_key(worker_id), json.dumps(state), px=int(ttl_s * 1000))
    pipe.zadd(K.WORKERS, {worker_id: int(time.time() * 1000)})
    pipe.execute()


def retire(r: redis.Redis, worker_id: str) -> None:
    """Remove a worker that stops cleanly from the registry at once."""
    pipe = r.pipeline(transaction=False)
    pipe.delete(K.worker_key(worker_id))
    pipe.zrem(K.WORKERS, worker_id)
    pipe.execute()
