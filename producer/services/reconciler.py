"""The reconciler: nothing waits for the visibility timeout, no job is ever stuck.

It runs inside every worker and every dispatcher, one process at a time fleet-wide:
every ``reconcile_interval_s`` each process tries to set :data:`~producer.core.keys.
RECONCILE_LOCK` (``SET NX`` expiring after one interval) and the one that sets it makes
a pass. A pass is safe to overlap with another (every change is a compare-and-set or
a WATCH transaction), so a slow pass that outlives its lock costs nothing but work.

A pass does three things:

1. **Expired leases.** A job is leased while a worker holds its message, and that
   worker's heartbeat renews the lease (``3 × worker_heartbeat_s``). When it runs out
   the worker is gone (killed, frozen, cut off): the job is fenced (a new token, so
   the old run can write nothing more) and its lease cleared in one compare-and-set
   that also checks the lease was not renewed meanwhile. A job that had started gets
   ``job.retrying {attempt, reason: "worker_lost"}``; one that has used
   ``max_attempts`` ends ``failed`` / ``worker_lost`` instead. Then its message goes
   back to the head of its queue: kombu's unacked entry moved in one transaction
   under a fresh delivery tag, or, when the broker no longer has it, re-published;
   never both.
2. **Lost messages.** A job waiting for a worker for more than ``reconcile_grace_s``,
   held by nobody, whose message is in none of its queue's lists: its unacked entry
   (taken longer ago than the grace, by a worker that never leased it) is moved back,
   or, with no entry at all, the message is re-published (same task id, same
   priority). This covers kombu's ``BRPOP`` window, a broker that lost its data, and a
   reconciler that died between fencing a job and moving its message.
3. **Dead dispatchers.** Consumers of the dispatchers' group idle for longer than
   ``webhook_claim_idle_s`` with nothing pending are deleted from it.

Each action is logged with the job id and counted (``atelier_reconciled_total
{reason}``): ``lease_expired``, ``worker_lost``, ``message_lost``,
``dispatcher_consumer``.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from producer.core import keys as K
from producer.core.contract import EventType, Record, Status, now_iso, terminal_event
from producer.core.errors import JobNotFound, WorkerLost
from producer.core.loops import run_every
from producer.core.registry import Registry
from producer.core.settings import Settings
from producer.jobs.broker import (
    drop_messages,
    list_key,
    restore_message,
    unacked_messages,
    waiting_jobs,
)
from producer.jobs.store import JobStore, Snapshot, lane_of

log = logging.getLogger("atelier.reconciler")

#: Reasons counted in ``atelier_reconciled_total``.
REASONS = K.RECONCILE_REASONS

#: A model with more jobs waiting than this, or more messages in its lists, has its
#: lost messages looked for at most once per ``reconcile_grace_s`` (each look reads
#: every waiting job id and every message of the queue).
LONG_QUEUE = 5000


def build(
    settings: Settings,
    store: JobStore,
    registry: Registry,
    app: Any,
    name: str,
    counted: Callable[[str], None] | None = None,
) -> Reconciler:
    """A process's reconciler: its broker connection (the store's own when they are one
    Redis) and ``app`` (a Celery app) to re-publish with."""
    from producer.core.redis_url import redis_client
    from producer.jobs.broker import send_job

    broker = (
        store.redis
        if settings.broker_url in (None, settings.redis_url)
        else redis_client(
            settings.effective_broker_url, "ATELIER_BROKER_URL", health_check_interval=30
        )
    )
    return Reconciler(
        settings,
        store,
        broker,
        registry,
        lambda job, model, prio: send_job(app, job, model, prio),
        name,
        counted=counted,
    )


class Reconciler:
    """One process's share of the fleet's reconciling (see the module docstring).

    ``publish(job_id, model, priority)`` sends a job's message (``broker.send_job``);
    ``counted(reason)`` is called once per action.
    """

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        broker: redis.Redis,
        registry: Registry,
        publish: Callable[[str, str, int], None],
        name: str,
        counted: Callable[[str], None] | None = None,
    ) -> None:
        self.settings, self.store, self.broker = settings, store, broker
        self.registry, self.publish, self.name = registry, publish, name
        self.counted = counted or (lambda reason: None)
        self.stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop -----------------------------------------------------------------------

    def start(self) -> Reconciler:
        self._thread = threading.Thread(target=self._loop, name="atelier-reconciler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        interval = self.settings.reconcile_interval_s
        # A quarter interval, jittered: passes stay about one per interval fleet-wide.
        run_every(
            self.stopped, lambda: interval * random.uniform(0.2, 0.3), self.tick, "reconciler pass"
        )

    def tick(self) -> bool:
        """Make a pass if no other process has made one within the last interval."""
        taken = self.store.redis.set(
            K.RECONCILE_LOCK, self.name, nx=True, px=int(self.settings.reconcile_interval_s * 1000)
        )
        if not taken:
            return False
        self.run_pass()
        return True

    def run_pass(self) -> dict[str, int]:
        done = {reason: 0 for reason in REASONS}
        for reason in self.take_back_expired():
            done[reason] += 1
        done["message_lost"] += self.republish_lost()
        done["dispatcher_consumer"] += self.prune_dispatchers()
        return done

    def _count(self, reason: str) -> None:
        try:
            self.counted(reason)
        except Exception:  # a metric never stops a pass
            log.debug("reconciler: counting %s failed", reason, exc_info=True)

    # -- 1. expired leases ----------------------------------------------------------------

    def take_back_expired(self) -> list[str]:
        reasons = []
        for job_id in self.store.expired_leases():
            try:
                snap = self.store.load(job_id)
            except JobNotFound:
                self.store.redis.zrem(K.LEASES, job_id)
                continue
            if snap.lease is None or snap.status.is_terminal():
                self.store.redis.zrem(K.LEASES, job_id)  # nothing holds it
                continue
            reason = self._take_back(job_id, snap)
            if reason is not None:
                reasons.append(reason)
                self._count(reason)
        return reasons

    def _take_back(self, job_id: str, snap: Snapshot) -> str | None:
        record, tag, started = snap.record, snap.tag or "", snap.status is Status.RUNNING
        lease = f"expired:{snap.lease}|{tag}"
        if started and record["attempts"] >= self.settings.max_attempts:
            err = WorkerLost(
                f"the worker running this job was lost {record['attempts']} times "
                f"(ATELIER_MAX_ATTEMPTS={self.settings.max_attempts})"
            ).to_error()
            lost: Record = {
                **record,
                "status": Status.FAILED,
                "finished_at": now_iso(),
                "error": err,
            }
            out = self.store.apply(
                job_id,
                allowed=Status.RUNNING.value,
                token=snap.token,
                record=lost,
                events=[terminal_event(lost)],
                lease=lease,
            )
            if not out.ok:
                return None
            drop_messages(self.broker, [tag] if tag else [])
            log.warning(
                "job %s: worker %s lost at attempt %d of %d: failed worker_lost",
                job_id,
                snap.lease,
                record["attempts"],
                self.settings.max_attempts,
                extra={"job_id": job_id},
            )
            return "worker_lost"
        attempt = record["attempts"] + 1
        retrying = (EventType.RETRYING, {"attempt": attempt, "reason": "worker_lost"})
        out = self.store.apply(
            job_id,
            allowed=f"{Status.QUEUED.value},{Status.RUNNING.value}",
            token=snap.token,
            new_token=secrets.token_hex(8),
            events=[retrying] if started else [],
            lease=lease,
            requeue=record,
            announce=attempt if started else None,
        )
        if not out.ok:
            return None  # renewed, ended or taken back meanwhile
        how = self._requeue(job_id, record, [tag] if tag else [])
        log.warning(
            "job %s: lease of worker %s expired (%s); message %s",
            job_id,
            snap.lease,
            "running" if started else "not started",
            how,
            extra={"job_id": job_id},
        )
        return "lease_expired"

    def _requeue(self, job_id: str, record: Record, tags: list[str]) -> str:
        """Put the job's message back at the head of its queue: its unacked entry if
        the broker still has one, else (and only then) a new message."""
        req = record["request"]
        lane = lane_of(record)  # a model's queue, or its trainings' (train.<model>)
        target = list_key(lane, int(req.get("priority", 5)))
        for tag in tags:
            if restore_message(self.broker, tag, target):
                return "restored"
        waiting, _ = waiting_jobs(self.broker, lane)
        if job_id in waiting or job_id in unacked_messages(self.broker):
            return "already queued"
        self.publish(job_id, lane, int(req.get("priority", 5)))
        return "re-published"

    # -- 2. lost messages -----------------------------------------------------------------

    def republish_lost(self) -> int:
        done = 0
        for lane, candidates in self._candidates(self.registry.lanes()).items():
            try:
                done += self._republish_lost(lane, candidates)
            except redis.RedisError:
                raise
            except Exception:
                log.exception("reconciler: checking queue %s failed", K.queue_name(lane))
        return done

    def _candidates(self, lanes: list[str]) -> dict[str, list[str]]:
        """Per lane, the jobs waiting longer than the grace and leased by nobody; lanes
        read less than a grace ago as long queues are skipped. Three round trips for
        every lane together (a registry has tens of lanes, and a pass that spends one
        round trip or more on each keeps a worker's Python busy beside its GPU)."""
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.time()
        for lane in lanes:
            pipe.exists(K.RECONCILE_SCAN + lane)
        (now_s, now_us), *scanned = pipe.execute()
        cutoff = max(
            int(now_s) * 1000 + int(now_us) // 1000 - int(self.settings.reconcile_grace_s * 1000), 0
        )
        lanes = [lane for lane, skip in zip(lanes, scanned, strict=True) if not skip]
        for lane in lanes:
            key = K.queued_index_key(lane)
            for band in range(10):
                low = band * K.QUEUED_BAND
                pipe.zrangebyscore(key, low, low + cutoff)
        found = pipe.execute()
        old = {
            lane: [j.decode() for ids in found[i * 10 : (i + 1) * 10] for j in ids]
            for i, lane in enumerate(lanes)
        }
        every = [j for ids in old.values() for j in ids]
        if not every:
            return {}
        scores: Any = self.store.redis.zmscore(K.LEASES, every)
        unleased = {j for j, score in zip(every, scores, strict=True) if score is None}
        return {
            lane: kept for lane, ids in old.items() if (kept := [j for j in ids if j in unleased])
        }

    def _republish_lost(self, model: str, candidates: list[str]) -> int:
        waiting, read = waiting_jobs(self.broker, model)
        if max(read, len(candidates)) > LONG_QUEUE:
            self.store.redis.set(
                K.RECONCILE_SCAN + model, "1", px=int(self.settings.reconcile_grace_s * 1000)
            )
        missing = [j for j in candidates if j not in waiting]
        if not missing:
            return 0
        taken = unacked_messages(self.broker)
        now = time.time()  # kombu stamps unacked_index with the taking worker's clock
        done = 0
        for job_id in missing:
            entries = taken.get(job_id, [])
            if any(now - e.taken_at < self.settings.reconcile_grace_s for e in entries):
                continue  # just taken: its worker is about to lease it
            try:
                snap = self.store.load(job_id)
            except JobNotFound:
                continue
            if snap.lease is not None or snap.status.is_terminal():
                continue  # leased (or ended) since the candidates were read
            how = self._requeue(job_id, snap.record, [e.tag for e in entries])
            if how == "already queued":
                continue
            log.warning(
                "job %s: %s waiting with its message in no queue; message %s",
                job_id,
                snap.status.value,
                how,
                extra={"job_id": job_id},
            )
            self._count("message_lost")
            done += 1
        return done

    # -- 3. dead dispatchers --------------------------------------------------------------

    def prune_dispatchers(self) -> int:
        try:
            consumers: Any = self.store.redis.xinfo_consumers(K.GLOBAL_EVENTS, K.DISPATCH_GROUP)
        except redis.ResponseError:  # no stream or no group yet
            return 0
        idle_ms = self.settings.webhook_claim_idle_s * 1000
        done = 0
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
            if int(c["pending"]) == 0 and int(c["idle"]) > idle_ms:
                self.store.redis.xgroup_delconsumer(K.GLOBAL_EVENTS, K.DISPATCH_GROUP, name)
                log.info(
                    "dispatcher consumer %s idle %.0f s with nothing pending: removed",
                    name,
                    int(c["idle"]) / 1000,
                )
                self._count("dispatcher_consumer")
                done += 1
        return done
