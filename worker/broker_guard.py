"""A guard on kombu's Redis transport, installed by the worker before it consumes.

When the broker's connection drops (a Redis restart) while a message is taken and not
acknowledged, Celery's consumer closes the connection and kombu then restores the
channel's unacknowledged messages through it: ``restore_unacked`` (and a task's
``Reject(requeue=True)``, ``restore_by_tag``) asks the closed connection for its address
and raises ``AttributeError`` (``'NoneType' object has no attribute 'hostname'``; kombu
issues #582 and #970 show the same). Celery takes that for an unrecoverable error and the
worker stops: one Redis restart takes a GPU worker down.

Guarded, a restore that finds its connection gone is skipped with a warning. The message
stays in kombu's unacknowledged set, where the reconciler finds it and moves it back to
its queue once it is older than ``RECONCILE_GRACE_S`` (docs/guarantees.md); the consumer
carries on reconnecting. Any other error is raised as before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("atelier.worker")


def _connection_gone(qos: Any) -> bool:
    transport = getattr(qos.channel, "connection", None)
    return transport is None or getattr(transport, "client", None) is None


def _guarded(restore: Callable[..., Any], what: str) -> Callable[..., Any]:
    @functools.wraps(restore)
    def guarded(qos: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return restore(qos, *args, **kwargs)
        except AttributeError:
            if not _connection_gone(qos):
                raise
            log.warning(
                "broker connection closed before kombu's %s: the message stays unacknowledged "
                "and the reconciler moves it back to its queue",
                what,
            )
            return None

    guarded.atelier_guarded = True  # type: ignore[attr-defined]
    return guarded


def install() -> None:
    """Guard kombu's Redis QoS restores (once per process)."""
    from kombu.transport import redis as kombu_redis

    qos = kombu_redis.QoS
    for name in ("restore_unacked", "restore_by_tag"):
        restore = getattr(qos, name)
        if not getattr(restore, "atelier_guarded", False):
            setattr(qos, name, _guarded(restore, name))
