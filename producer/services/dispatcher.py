"""The webhook dispatcher: ``atelier dispatcher``.

It reads the global event stream through a consumer group, so several dispatchers
share the work and an event is handled by one of them. For each event whose job asked
for a webhook and whose type passes the job's ``webhook_events`` filter it sends one
signed POST (:mod:`producer.services.webhooks`). Then:

- delivered, refused for good (410, a non-public address) or not wanted: ``XACK``;
- failed but retryable: the event goes to a sorted set of retries, due after the next
  delay of ``webhook_retry_schedule_s`` (with jitter, at least what ``Retry-After``
  asked), and is acknowledged, both in one transaction. Progress events are sent once.

Nothing is lost when a dispatcher dies: an event it took but did not acknowledge stays
pending in the group and another dispatcher claims it (``XAUTOCLAIM``) once it has been
idle ``webhook_claim_idle_s``; a retry it took is leased the same way (its score is
pushed ``webhook_claim_idle_s`` ahead while it runs). The ``webhook-id`` is the event
id, so a receiver can drop the rare duplicate this allows.

Every attempt is logged beside the job (``JobStore.record_delivery``) and shown with
the job by the API. The dispatcher writes Redis only through the store and its
:class:`~producer.services.webhook_queue.WebhookQueue` (the group's stream, the retries).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis

from producer.core.contract import Event, EventType, now_iso
from producer.core.logs import configure as configure_logging
from producer.core.logs import job_context
from producer.core.metrics import DispatcherMetrics, serve
from producer.core.settings import Settings
from producer.jobs.store import JobStore
from producer.services.webhook_queue import WebhookQueue, retry_member
from producer.services.webhooks import FILTER_NAME, Result, attempt

log = logging.getLogger("atelier.dispatcher")

#: The longest ``Retry-After`` honoured; a receiver asking for more gets this.
MAX_RETRY_AFTER_S = 24 * 3600


def _ms() -> int:
    return int(time.time() * 1000)


class Dispatcher:
    def __init__(
        self, settings: Settings, store: JobStore | None = None, name: str | None = None
    ) -> None:
        if not settings.webhook_secret:
            raise ValueError("the dispatcher needs ATELIER_WEBHOOK_SECRET (whsec_...)")
        self.settings = settings
        self.store = store or JobStore.from_url(settings.redis_url, settings.result_ttl_s)
        self.queue = WebhookQueue(self.store.redis)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.schedule = settings.retry_schedule
        self.pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook")
        self.inflight: set[Future[None]] = set()
        self.stopping = threading.Event()
        self._next_claim = 0.0
        self.metrics = DispatcherMetrics(self.store.redis)

    # -- the loop ---------------------------------------------------------------------

    def ensure_group(self) -> None:
        self.queue.ensure_group()

    def run(self) -> None:
        log.info("atelier dispatcher %s ready", self.name)
        while not self.stopping.is_set():
            try:
                self.ensure_group()
                self._loop()
            except redis.RedisError as exc:
                # Redis restarting: wait and carry on; pending entries are still there.
                log.warning("dispatcher: Redis unavailable (%s); retrying", exc)
                self.stopping.wait(1.0)
        self._drain()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self._reap()
            free = self.settings.webhook_concurrency - len(self.inflight)
            if free <= 0:
                time.sleep(0.05)
                continue
            took = self._take_retries(free)
            free -= took
            if free > 0 and time.monotonic() >= self._next_claim:
                took += self._take_abandoned(free)
                self._next_claim = time.monotonic() + min(5.0, self.settings.webhook_claim_idle_s)
                free = self.settings.webhook_concurrency - len(self.inflight)
            if free > 0:
                # Wait for new events until the next retry comes due (at most 1 s).
                block = 1000
                due = self.queue.next_due_ms()
                if due is not None:
                    block = int(min(1000, max(10, due - _ms())))
                if self.inflight or took:
                    block = min(block, 200)
                for event in self.queue.read_new(self.name, free, block):
                    self._submit(self._handle_new, event)

    def stop(self) -> None:
        self.stopping.set()

    def _drain(self) -> None:
        # Deliveries in flight finish (each is bounded by the timeouts); what they did
        # not acknowledge another dispatcher claims.
        self.pool.shutdown(wait=True)
        log.info("atelier dispatcher %s stopped", self.name)

    def _submit(self, fn: Any, *args: Any) -> None:
        fut = self.pool.submit(self._guarded, fn, *args)
        self.inflight.add(fut)

    def _reap(self) -> None:
        self.inflight = {f for f in self.inflight if not f.done()}

    @staticmethod
    def _guarded(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except redis.RedisError as exc:
            # Left pending (or leased): another pass, or dispatcher, takes it again.
            log.warning("dispatcher: Redis error while handling %s: %s", args, exc)
        except Exception:
            log.exception("dispatcher: unexpected error while handling %s", args)

    def _take_retries(self, limit: int) -> int:
        lease = _ms() + int(self.settings.webhook_claim_idle_s * 1000)
        members = self.queue.take_due(_ms(), lease, limit)
        for member in members:
            self._submit(self._handle_retry, member)
        return len(members)

    def _take_abandoned(self, limit: int) -> int:
        """Claim events another dispatcher took and never acknowledged (it died)."""
        events, claimed = self.queue.claim_abandoned(
            self.name, int(self.settings.webhook_claim_idle_s * 1000), limit
        )
        for event in events:
            log.info("dispatcher %s: claimed abandoned event %s", self.name, event["id"])
            self._submit(self._handle_new, event)
        return claimed

    # -- one event --------------------------------------------------------------------

    def _target(self, event: Event) -> tuple[str, bool] | None:
        """The URL to send ``event`` to and whether to retry it, or None to skip it."""
        name = FILTER_NAME.get(EventType(event["type"]))
        if name is None:
            return None
        request = self.store.request_of(event["job_id"])
        if request is None:
            return None  # the job's record expired
        url = request.get("webhook")
        if not url or name not in request.get("webhook_events", ["completed"]):
            return None
        return url, name != "progress"  # progress is best effort: sent once

    def _handle_new(self, event: Event) -> None:
        with job_context(event["job_id"]):
            self._handle_new_event(event)

    def _handle_new_event(self, event: Event) -> None:
        target = self._target(event)
        if target is not None:
            url, retryable = target
            result = self._send(url, event)
            due = self._due_ms(result) if retryable else None
            if due is not None:
                member = retry_member(event["job_id"], event["id"])
                self.queue.retry_later(member, due, ack=event["id"])
                return
        self.queue.ack(event["id"])

    def _handle_retry(self, member: str) -> None:
        job_id, event_id = member.split("/", 1)
        with job_context(job_id):
            self._handle_retry_event(member, job_id, event_id)

    def _handle_retry_event(self, member: str, job_id: str, event_id: str) -> None:
        event = self.store.event(job_id, event_id)
        target = self._target(event) if event is not None else None
        if event is None or target is None:  # the job's log expired, or the webhook is gone
            self.queue.drop(member)
            return
        result = self._send(target[0], event)
        due = self._due_ms(result)
        if due is not None:
            self.queue.retry_later(member, due)
            return
        self.queue.drop(member)

    def _send(self, url: str, event: Event) -> Result:
        number = 1 + sum(
            1 for d in self.store.deliveries(event["job_id"]) if d["event_id"] == event["id"]
        )
        result = attempt(url, event, self.settings)
        result.attempt = number
        entry: dict[str, Any] = {
            "event_id": event["id"],
            "type": event["type"],
            "attempt": number,
            "at": now_iso(),
            "status": result.status,
            "error": result.error,
            "duration_ms": result.duration_ms,
            "outcome": result.outcome,
            "dispatcher": self.name,
        }
        if result.outcome == "retry":
            if number > len(self.schedule) or event["type"] == EventType.PROGRESS:
                entry["outcome"] = result.outcome = "gave_up"
        self.store.record_delivery(event["job_id"], entry)
        self.metrics.delivered(event["type"], entry["outcome"], result.duration_ms)
        log.info(
            "webhook %s %s attempt %d: %s %s",
            event["id"],
            event["type"],
            number,
            entry["outcome"],
            result.status or result.error,
        )
        return result

    def _due_ms(self, result: Result) -> int | None:
        """When to try again, or None when the schedule is spent."""
        if result.outcome != "retry" or result.attempt > len(self.schedule):
            return None
        delay = self.schedule[result.attempt - 1] * random.uniform(0.8, 1.2)
        if result.retry_after_s is not None:  # honoured, up to a day
            delay = max(delay, min(result.retry_after_s, MAX_RETRY_AFTER_S))
        return _ms() + int(delay * 1000)


def main(settings: Settings) -> int:
    configure_logging(settings.log_format, settings.log_level)
    dispatcher = Dispatcher(settings)
    if settings.metrics_port:
        serve(dispatcher.metrics.registry, settings.metrics_port)
    # The dispatcher is always on: it reconciles even when the workers are scaled to
    # zero, so a lost job shows in its queue's depth again and KEDA scales up for it.
    from producer.core.registry import Registry
    from producer.jobs.broker import make_celery
    from producer.services.reconciler import build as build_reconciler

    reconciler = build_reconciler(
        settings,
        dispatcher.store,
        Registry.load(settings.models_file),
        make_celery(settings, "atelier-reconciler"),
        f"dispatcher:{dispatcher.name}",
        counted=lambda reason: dispatcher.metrics.reconciled.labels(reason).inc(),
    ).start()

    def _stop(signum: int, frame: object) -> None:
        log.info("dispatcher: signal %d, finishing deliveries in flight", signum)
        dispatcher.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        dispatcher.run()
    finally:
        reconciler.stop()
    return 0
