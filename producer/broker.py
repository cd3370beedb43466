"""Celery configuration shared by the producer (which sends) and the worker (which runs).

Both sides must agree on serializer, queues and transport options, so they are built
here, once. JSON only: Celery refuses any other content type.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer import constants as K
from producer.redis_url import kombu_broker
from producer.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    # A sentinel:// URL becomes kombu's form: one URL per Sentinel, and the service name
    # as a transport option (producer/redis_url.py).
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
        "worker_send_task_events": True,
        "task_send_sent_event": False,
    }


def make_celery(settings: Settings, name: str = "atelier") -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def celery_priority(priority: int) -> int:
    """atelier's 0–9 (higher first) as the Redis transport's 0–9 (lower first)."""
    return 9 - priority


def queue_depth(broker: Any, model: str) -> int:
    """Messages waiting in a model's queue: the sum of its priority lists' lengths.

    ``broker`` is a redis client on the broker's database. Messages a worker has taken
    (unacknowledged) are not counted; this is the number KEDA scales on.
    """
    pipe = broker.pipeline(transaction=False)
    for key in K.queue_keys(model):
        pipe.llen(key)
    return int(sum(pipe.execute()))
