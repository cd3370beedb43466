"""Background loops that must outlive every failure of the thing they call.

The heartbeat (it carries every held job's lease) and the reconciler (it takes back
what a lost worker held) run one in each process; a Redis outage or a bug in one pass
must cost that pass only, never the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

log = logging.getLogger("atelier.loops")


def run_every(
    stopped: threading.Event, period_s: Callable[[], float], work: Callable[[], object], what: str
) -> None:
    """Call ``work`` after each ``period_s()`` until ``stopped`` is set. A Redis error is
    a warning and any other exception is logged with its traceback; neither ends it."""
    while not stopped.wait(period_s()):
        try:
            work()
        except redis.RedisError as exc:
            log.warning("%s: Redis unavailable (%s)", what, exc)
        except Exception:
            log.exception("%s failed", what)
