"""Celery configuration shared by the producer (which sends) and the worker (which runs).

Both sides must agree on serializer, queues and transport options, so they are built
here, once. JSON only: Celery refuses any other content type.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from producer.core import keys as K
from producer.core.redis_url import kombu_broker
from producer.core.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    # A sentinel:// URL becomes kombu's form: one URL per Sentinel, and the service name
    # as a transport option (producer/core/redis_url.py).
    broker_url, sentinel_options = kombu_broker(settings.effective_broker_url)
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            **sentinel_options,
            # Above the longest a taken message can take to finish: see Settings.
            "visibility_timeout": settings.effective_visibility_timeout_s,
            # Sweep for messages of dead workers every restore_interval_s (kombu's
            # default throttle would make it ten times that).
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            # A sweep holds a Redis lock that expires after this; kombu's default 300 s
            # meant a worker killed mid-sweep (a main thread starved of the GIL by
            # denoising makes the sweep long) stopped every worker's sweeps, so lost
            # messages came back 5 minutes late. Sweeps restore each message in a
            # WATCH transaction, so two overlapping ones are harmless.
            "unacked_mutex_expire": max(2, settings.restore_interval_s),
            # Ten priority lists per queue; the Redis transport serves 0 first, so the
            # producer maps atelier's priority p (9 = most urgent) to 9 - p.
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        # At-least-once: acknowledge after the task (outputs stored), requeue when the
        # worker process dies, take one message per free slot.
        "task_acks_late": True,
        # A task that raises (JobEndedFailed: a failure already recorded) is acknowledged
        # too: it must not run again. Celery's default, stated because it matters.
        "task_acks_on_failure_or_timeout": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": K.queue_name(settings.default_model),
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        # Flower enables them itself while it runs (Settings.task_events).
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
    }


def make_celery(settings: Settings, name: str = "atelier") -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def celery_priority(priority: int) -> int:
    """atelier's 0–9 (higher first) as the Redis transport's 0–9 (lower first)."""
    return 9 - priority


def send_job(app: Celery, job_id: str, model: str, priority: int) -> None:
    """Publish a job's message: the body is ``[job_id]``; the record holds the request.

    ``model`` is the job's lane (:func:`producer.core.keys.lane`): a model's name for a
    generation, ``train.<model>`` for a training, whose task is ``atelier.train``."""
    app.send_task(
        K.task_of(model),
        args=[job_id],
        # The task id is the job id: Celery's log lines and task events (Flower) name
        # the job, and the reconciler finds a job's message by it.
        task_id=job_id,
        queue=K.queue_name(model),
        priority=celery_priority(priority),
    )


def list_key(model: str, priority: int) -> str:
    """The Redis list a message of ``priority`` (atelier's 0–9) waits in."""
    return K.queue_keys(model)[celery_priority(priority)]


# -- kombu's messages, as its Redis transport keeps them --------------------------------
#
# A message waiting is a JSON string in one of its queue's lists (``LPUSH`` in, ``BRPOP``
# out: the right end is the head). One a worker took is in the ``unacked`` hash under its
# delivery tag (``[payload, exchange, routing_key]``) with the time it was taken in
# ``unacked_index``, until the worker acknowledges it. The reconciler reads both to find
# a job's message, and moves one back to the head of its list the way kombu's own
# restore does, in one WATCH transaction.


def _job_of(payload: dict[str, Any]) -> str | None:
    headers = payload.get("headers") or {}
    if headers.get("task") not in K.TASKS:
        return None
    job = headers.get("id")
    return job if isinstance(job, str) else None


@dataclass
class Unacked:
    """A message a worker took and has not acknowledged."""

    tag: str
    taken_at: float  # unix time (the taking worker's clock)


def unacked_messages(broker: redis.Redis) -> dict[str, list[Unacked]]:
    """Every atelier message taken and not acknowledged, by job id."""
    raw: Any = broker.hgetall(K.UNACKED)
    scores: Any = broker.zrange(K.UNACKED_INDEX, 0, -1, withscores=True)
    taken = {t.decode(): float(sc) for t, sc in scores}
    out: dict[str, list[Unacked]] = {}
    for tag_b, value in raw.items():
        tag = tag_b.decode()
        try:
            job = _job_of(json.loads(value)[0])
        except (ValueError, IndexError, TypeError, AttributeError):
            continue
        if job is not None:
            out.setdefault(job, []).append(Unacked(tag, taken.get(tag, 0.0)))
    return out


def waiting_jobs(broker: redis.Redis, model: str, page: int = 1000) -> tuple[set[str], int]:
    """The job ids of the messages in a model's queue lists, and how many were read."""
    found: set[str] = set()
    read = 0
    for key in K.queue_keys(model):
        start = 0
        while True:
            items: Any = broker.lrange(key, start, start + page - 1)
            for item in items:
                try:
                    job = _job_of(json.loads(item))
                except (ValueError, AttributeError):
                    continue
                if job is not None:
                    found.add(job)
            read += len(items)
            if len(items) < page:
                break
            start += page
    return found, read


def restore_message(broker: redis.Redis, tag: str, to_list: str) -> bool:
    """Move a taken message back to the head of ``to_list`` under a fresh delivery tag,
    in one transaction; False when ``tag`` is no longer in ``unacked``.

    The fresh tag matters: a run that was taken over may still acknowledge its own tag
    later, and that must not remove the entry of the worker that runs the job now.
    """
    restored = [False]

    def move(pipe: Any) -> None:
        raw = pipe.hget(K.UNACKED, tag)
        if raw is None:
            pipe.multi()  # nothing to move; an empty transaction
            return
        payload = json.loads(raw)[0]
        payload.setdefault("headers", {})["redelivered"] = True
        props = payload.setdefault("properties", {})
        props.setdefault("delivery_info", {})["redelivered"] = True
        props["delivery_tag"] = str(uuid.uuid4())
        pipe.multi()
        pipe.zrem(K.UNACKED_INDEX, tag)
        pipe.hdel(K.UNACKED, tag)
        pipe.rpush(to_list, json.dumps(payload))
        restored[0] = True

    broker.transaction(move, K.UNACKED)
    return restored[0]


def drop_messages(broker: redis.Redis, tags: Iterable[str]) -> None:
    """Forget taken messages whose job has ended (as an acknowledgement would)."""
    tags = list(tags)
    if tags:
        pipe = broker.pipeline(transaction=True)
        pipe.zrem(K.UNACKED_INDEX, *tags)
        pipe.hdel(K.UNACKED, *tags)
        pipe.execute()


def queue_depth(broker: Any, model: str) -> int:
    """Messages waiting in a model's queue: the sum of its priority lists' lengths.

    ``broker`` is a redis client on the broker's database. Messages a worker has taken
    (unacknowledged) are not counted; this is the number KEDA scales on.
    """
    pipe = broker.pipeline(transaction=False)
    for key in K.queue_keys(model):
        pipe.llen(key)
    return int(sum(pipe.execute()))
