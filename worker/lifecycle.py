"""A job's lifecycle, whatever the job does: plain code the Celery tasks adapt.

What a kind of job does is its :class:`Work` (generation: ``worker/generation``); the
rest is here, the same for every kind. :meth:`Lifecycle.run`:

1. Lease the job to this worker and read it, in one round trip (:meth:`JobStore.hold`).
2. ``work.prepare(request)``: I/O the job needs before it may hold the device (fetching
   inputs), so that a slow server delays only this job while another one computes.
3. Wait for the device (one job at a time per device; at warm shutdown a job still
   waiting is given back to the queue instead).
4. Start: compare-and-set the record to ``running`` with a fresh fence token, counting
   the attempt, or end it at once (cancelled, expired, or out of attempts).
5. ``work(run, prepared)``, given the :class:`Run`: it reports progress (``run.report``,
   published by the monitor thread while ``run.watched()``), checks for cancel, deadline
   and fence at each step (``run.check``), writes its events (``run.emit``), lets the
   device go when done with it (``run.release_device``) and ends with ``run.succeed``.
   What it raises ends the job: :class:`JobError` failed with its code, ``JobCancelled``
   cancelled, anything else failed ``internal``; ``Fenced`` ends this run silently.
6. The lease is let go, unless the terminal write of this run cleared it.

The run (``worker/run.py``) is what the work sees; every write of it is a compare-and-set
on its token, so a run that lost its job writes nothing more. Nothing here knows about
images or pipelines: a new kind of job is a new :class:`Work`, nothing else.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis

from producer.core.contract import (
    ErrorInfo,
    EventType,
    Kind,
    Record,
    Status,
    is_expired,
    now_iso,
    terminal_event,
)
from producer.core.errors import Fenced, GiveBack, JobCancelled, JobError, WorkerLost
from producer.core.normalized import NormalizedRequest
from producer.core.settings import Settings
from producer.jobs.store import HoldResult, JobStore, Snapshot
from worker.affinity import Pinning
from worker.metrics import BusyClock, WorkerMetrics
from worker.run import Monitor, Run

log = logging.getLogger(__name__)


class Work(Protocol):
    """What one kind of job does; the lifecycle does everything else."""

    #: The record's ``kind`` this work runs.
    kind: Kind

    def total(self, request: NormalizedRequest) -> int:
        """The progress total a run starts with (``progress: {step: 0, total}``)."""
        ...

    def prepare(self, request: NormalizedRequest) -> Any:
        """Before the device: fetch what the job needs. None when there was nothing to
        do (then the record read a moment ago still counts as fresh). A JobError raised
        here fails the job once it has started."""
        ...

    def __call__(self, run: Run, prepared: Any, /) -> Status | None:
        """Run the job holding the device; return ``run.succeed(...)``."""
        ...


class Lifecycle:
    """Runs jobs of the kinds in ``works`` to their terminal states, one at a time on
    the device; holds what the process shares between jobs (the device lock, the
    monitor thread, the held jobs the heartbeat renews)."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        worker_name: str,
        works: Iterable[Work],
        metrics: WorkerMetrics | None = None,
        pinning: Pinning | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.worker_name = worker_name
        self.works = {w.kind: w for w in works}
        self.metrics = metrics or WorkerMetrics()
        # One job at a time per device; post-processing runs outside it.
        self.gpu = DeviceLock()
        #: ATELIER_DEVICE_CPUS: the slot holding the device runs on its own CPUs.
        self.pinning = pinning
        # For the heartbeat: jobs held now, and messages handled since start.
        self._lock = threading.Lock()
        self.current: set[str] = set()
        self.jobs_done = 0
        self._monitor: Monitor | None = None
        self._monitor_lock = threading.Lock()
        #: Set at warm shutdown (SIGTERM): jobs already running finish, a job still
        #: waiting for the device is given back rather than started.
        self.draining = threading.Event()

    def drain(self) -> None:
        """Start no more jobs: the ones waiting for the device go back to the queue."""
        self.draining.set()
        self.gpu.stop_waiting()

    def activity(self) -> tuple[list[str], int]:
        """Jobs held now (the heartbeat renews their leases), and messages handled since
        start."""
        with self._lock:
            return sorted(self.current), self.jobs_done

    def monitor(self) -> Monitor:
        """The process's one monitor thread, started on first use."""
        with self._monitor_lock:
            if self._monitor is None or not self._monitor.is_alive():
                self._monitor = Monitor(
                    self.settings.progress_interval_s, self.settings.preview_interval_s
                )
                self._monitor.start()
                if self.pinning is not None:
                    # Started by the slot that holds the device, whose CPUs it inherits.
                    self.pinning.to_host(self._monitor.native_id)
            return self._monitor

    def run(self, job_id: str, tag: str | None = None, kind: Kind = Kind.GENERATE) -> Status | None:
        """Run a job of ``kind`` to a terminal state; returns it (None when this run was
        fenced, the job had already ended, or another worker holds it).

        ``tag`` is the delivery tag of the message being handled: the job is leased to
        this worker for that message (see :meth:`JobStore.hold`) until it ends, and the
        heartbeat renews the lease meanwhile.
        """
        work = self.works[kind]
        with self._lock:
            if job_id in self.current:
                # A second message for a job another slot holds (a backstop redelivery):
                # that slot runs it.
                log.warning(
                    "job %s: already held by this worker; duplicate message dropped",
                    job_id,
                    extra={"job_id": job_id},
                )
                return None
            self.current.add(job_id)
        tag = tag or f"direct-{secrets.token_hex(8)}"  # no broker message (tests)
        status: Status | None = None
        try:
            status = self._run(job_id, tag, work)
            return status
        finally:
            try:
                # Ended by this run: its terminal write cleared the lease. Given back,
                # dropped or fenced: let go, so nothing waits for the lease to run out.
                if status is None:
                    self.store.release(job_id, self.worker_name, tag)
            except redis.RedisError as exc:
                log.warning(
                    "job %s: lease not released (%s); it expires by itself",
                    job_id,
                    exc,
                    extra={"job_id": job_id},
                )
            finally:
                with self._lock:
                    self.current.discard(job_id)
                    self.jobs_done += 1

    def _run(self, job_id: str, tag: str, work: Work) -> Status | None:
        snap = self._hold(job_id, tag)
        if snap is None:
            return None  # no record, finished already, or another worker holds it
        prepared: Any = None
        failed: JobError | None = None
        try:
            prepared = work.prepare(snap.record["request"])
        except JobError as exc:
            failed = exc  # recorded once started, like any failure of the job
        # An uncontended device right after the record was read: start from that read
        # (one round trip less; the start's compare-and-set still checks the token).
        fresh = prepared is None and failed is None and self.gpu.acquire(blocking=False)
        if not fresh:
            self._wait_for_gpu(job_id)
        device = _Device(self.gpu, self.metrics.busy, self.pinning)
        try:
            if self.draining.is_set():
                # Shutting down with the device just freed: this job has not started, so
                # another worker runs it now rather than this one delaying its exit.
                raise GiveBack(job_id)
            run = self._start(job_id, snap if fresh else None, work, device.release)
            if run is None:
                return None
            if failed is not None:
                return run.finish(Status.FAILED, error=failed.to_error())
            return self._work(run, work, prepared)
        finally:
            device.release()

    def _work(self, run: Run, work: Work, prepared: Any) -> Status | None:
        """The work, its exceptions mapped to the job's end."""
        try:
            return work(run, prepared)
        except Fenced:
            log.warning("job %s: fenced during %s; another run owns it", run.job_id, run.stage)
            return None
        except JobCancelled:
            return run.finish(Status.CANCELLED)
        except JobError as exc:
            return run.finish(Status.FAILED, error=exc.to_error())
        except redis.RedisError:
            raise  # the store is unreachable: the task requeues the message
        except Exception as exc:
            log.exception("job %s: %s failed", run.job_id, run.stage)
            return run.finish(Status.FAILED, error=_internal(exc))

    def _wait_for_gpu(self, job_id: str) -> None:
        # A slot waits here while the other computes; at shutdown it stops waiting.
        if not self.gpu.acquire():
            raise GiveBack(job_id)

    def _hold(self, job_id: str, tag: str, grace_s: float = 5.0) -> Snapshot | None:
        """Lease the job to this worker and read it, in one round trip.

        The producer sends the message before it writes the record, so a worker can see
        the message a moment early; a message whose record never comes (the producer
        failed in between) is dropped. The record usually follows within a millisecond:
        poll fast, then back off.
        """
        deadline = time.monotonic() + grace_s
        pause = 0.001
        ttl_s = self.settings.lease_ttl_s
        while True:
            held = self.store.hold(job_id, self.worker_name, tag, ttl_s)
            if held.result is HoldResult.OK:
                return held.snapshot
            if held.result is HoldResult.HELD:
                log.warning(
                    "job %s: held by worker %s; duplicate message dropped",
                    job_id,
                    held.holder,
                    extra={"job_id": job_id},
                )
                return None
            if held.result is not HoldResult.MISSING:
                return None  # a duplicate delivery of a finished job
            if time.monotonic() > deadline:
                log.warning("job %s has no record (never written, or expired): dropped", job_id)
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _start(
        self, job_id: str, snap: Snapshot | None, work: Work, release_device: Callable[[], None]
    ) -> Run | None:
        if snap is None:
            snap = self.store.load(job_id)  # again: it may have changed while we waited
        if self._ended_unstarted(job_id, snap):
            return None
        record = snap.record
        attempt = record["attempts"] + 1
        token = secrets.token_hex(8)
        total = work.total(record["request"])
        new: Record = {
            **record,
            "status": Status.RUNNING,
            "attempts": attempt,
            "worker": self.worker_name,
            "started_at": now_iso(),
            "progress": {"step": 0, "total": total},
            "error": None,
            "outputs": [],  # nothing of an earlier attempt carries over
            "timings": {},
        }
        events: list[tuple[EventType, dict[str, Any]]] = []
        if attempt > 1 and snap.announced < attempt:
            # The reconciler announces the retry when it takes a job back; a run that
            # ended otherwise (the store unreachable, the visibility timeout) is
            # announced here.
            events.append((EventType.RETRYING, {"attempt": attempt, "reason": "worker_lost"}))
        events.append((EventType.STARTED, {"attempt": attempt, "worker": self.worker_name}))
        out = self.store.apply(
            job_id,
            allowed=_STARTABLE,
            token=snap.token,
            record=new,
            new_token=token,
            events=events,
            lease=f"held:{self.worker_name}",
        )
        if not out.ok:
            log.info("job %s: not started (%s)", job_id, out.reason)
            return None
        timeout_s = record["request"].get("timeout_s") or self.settings.job_timeout_s
        return Run(
            job_id,
            token,
            new,
            time.monotonic() + timeout_s,
            total,
            self.store,
            self.metrics,
            self.monitor,
            release_device,
        )

    def _ended_unstarted(self, job_id: str, snap: Snapshot) -> bool:
        """Whether the job ends here without running: terminal already, cancelled
        before it started, expired in the queue, or out of attempts."""
        record = snap.record
        if snap.status.is_terminal():
            return True
        if snap.cancel_requested:
            self._end_unstarted(job_id, snap, Status.CANCELLED)
            return True
        if snap.status is Status.QUEUED and is_expired(record):
            if self.store.expire(job_id, snap).ok:
                self.metrics.job_ended(record["request"]["model"], Status.EXPIRED.value, None, None)
            return True
        if snap.status is Status.RUNNING and record["attempts"] >= self.settings.max_attempts:
            # Every earlier run died without a word: this job kills its worker.
            err = WorkerLost(
                f"the worker running this job was lost {record['attempts']} times "
                f"(ATELIER_MAX_ATTEMPTS={self.settings.max_attempts})"
            )
            self._end_unstarted(job_id, snap, Status.FAILED, err.to_error())
            return True
        return False

    def _end_unstarted(
        self, job_id: str, snap: Snapshot, status: Status, error: ErrorInfo | None = None
    ) -> None:
        record: Record = {**snap.record, "status": status, "finished_at": now_iso(), "error": error}
        out = self.store.apply(
            job_id,
            allowed=_STARTABLE,
            token=snap.token,
            record=record,
            events=[terminal_event(record)],
        )
        if out.ok:
            self.metrics.job_ended(record["request"]["model"], status.value, error, None)


_STARTABLE = f"{Status.QUEUED.value},{Status.RUNNING.value}"


class DeviceLock:
    """One job at a time on the device. A waiter sleeps until the device is free or the
    worker drains (:meth:`stop_waiting`), with no timed wake-ups: the slot that waits
    does so beside a job that is computing, and every wake-up of a Python thread there
    takes the GIL from the denoising loop (a ``Lock.acquire(timeout=0.05)`` poll woke
    six times in each tiny job)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held = False
        self._stopped = False

    def acquire(self, blocking: bool = True) -> bool:
        """Take the device; False when it is busy and ``blocking`` is false, or when
        waiting stopped (a free device is still taken after that)."""
        with self._cond:
            while self._held:
                if not blocking or self._stopped:
                    return False
                self._cond.wait()
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify()

    def stop_waiting(self) -> None:
        """Wake every waiter to give its job back (warm shutdown)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class _Device:
    """The device lock, already acquired, and the busy clock running while it is held;
    released once, by the work (``run.release_device``) or at the run's end, in the
    thread that took it. With ATELIER_DEVICE_CPUS that thread runs on the device's CPUs
    meanwhile."""

    def __init__(self, lock: DeviceLock, busy: BusyClock, pinning: Pinning | None) -> None:
        self._lock, self._busy, self._pinning = lock, busy, pinning
        self._held = True
        if pinning is not None:
            pinning.to_device()
        busy.begin()

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            # Stopped while still holding the lock, so the next holder's begin cannot
            # come between.
            self._busy.end()
        finally:
            self._lock.release()
            if self._pinning is not None:
                self._pinning.to_host()  # post-processing runs beside the next job


def _internal(exc: BaseException) -> ErrorInfo:
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
