"""The baseline of bench/overhead.py: a raw Celery task that does nothing.

Same Redis, same broker configuration as atelier (``producer.jobs.broker.celery_config``:
JSON, acks_late, prefetch 1, priority lists), same threads pool and concurrency, plus
Celery's own Redis result backend so the caller learns that the task ran
(``AsyncResult.get``, which waits on a pub/sub channel). This is the least any
Celery-based queue can cost per job on this machine.

Worker: ``python bench/celery_noop.py worker`` (settings from ATELIER_* variables).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402

from producer.core.settings import Settings  # noqa: E402
from producer.jobs.broker import celery_config  # noqa: E402

QUEUE = "bench.noop"
TASK = "bench.noop"
READY = "celery no-op worker ready"


def make_app(settings: Settings) -> Celery:
    app = Celery("bench-noop", set_as_current=False)
    conf = celery_config(settings)
    conf.update(
        task_ignore_result=False,
        result_backend=settings.redis_url,
        task_default_queue=QUEUE,
        result_expires=600,
    )
    app.conf.update(conf)

    def noop() -> None:
        return None

    # Called, not used as decorators: celery ships no annotations, and mypy (strict)
    # refuses an untyped decorator. The app keeps the task it registers.
    app.task(name=TASK)(noop)
    return app


def main() -> int:
    from celery.signals import worker_ready

    settings = Settings()

    def _ready(**_: object) -> None:
        print(READY, file=sys.stderr, flush=True)

    worker_ready.connect(_ready, weak=False)

    app = make_app(settings)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={QUEUE}",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=WARNING",
            "--hostname=noop@%h",
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
