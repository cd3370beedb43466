"""One attempt at a job: the :class:`Run` a :class:`~worker.lifecycle.Work` is given,
and the :class:`Monitor` thread that publishes its progress.

A run reports progress and checks for cancel, deadline and fence from the work's step
callback with flags and the clock only (no I/O on the loop's critical path); the monitor
thread does the I/O beside it. Every write of a run is one compare-and-set on its token
(:meth:`Run._apply`): a run that lost its job writes nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from typing_extensions import TypedDict, Unpack

from producer.core.contract import (
    Checkpoint,
    ErrorInfo,
    EventType,
    Output,
    Progress,
    Record,
    Status,
    now_iso,
    parse_iso,
    terminal_event,
)
from producer.core.errors import Fenced, JobCancelled, JobTimeout
from producer.jobs.store import JobStore, Outcome
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class Preview(Protocol):
    """A run's live previews (``worker/diffusion/preview.py``): rendered on the monitor thread."""

    def render(self) -> str | None:
        """A picture of the newest state not yet rendered (a data URI), or None."""
        ...


class Changes(TypedDict, total=False):
    """What an event may change in the record beside it (:meth:`Run.emit`)."""

    outputs: list[Output]
    checkpoint: Checkpoint
    checkpoints: list[int]


@dataclass
class Run:
    """One attempt at a job, owned by this process while ``token`` is the job's: what a
    :class:`Work` is given to report, check and finish with."""

    job_id: str
    token: str
    record: Record
    deadline: float
    total: int
    store: JobStore
    metrics: WorkerMetrics
    monitor: Callable[[], Monitor]
    #: Lets the device go (idempotent); the lifecycle calls it at the end regardless.
    release_device: Callable[[], None]
    step: int = 0
    #: Extra fields of the progress events, beside step and total (e.g. a loss).
    fields: dict[str, Any] = field(default_factory=dict)
    #: What the run is doing, for log lines.
    stage: str = "work"
    cancel: threading.Event = field(default_factory=threading.Event)
    fenced: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Set (under ``lock``) when the watched block has ended: no progress after it.
    ended: bool = False
    #: Set by a work whose request asked for previews, before its watched block.
    preview: Preview | None = None

    @property
    def request(self) -> dict[str, Any]:
        """The job's normalised request; each work reads it as its own kind's
        (``GenerateRequest``, ``TrainingRequest``: one cast where it starts)."""
        return cast(dict[str, Any], self.record["request"])

    # -- from the step callback: flags and the clock only, no I/O ---------------------

    def report(self, step: int, total: int | None = None, **fields: Any) -> None:
        """The progress the monitor thread publishes (throttled) while watched."""
        self.step = step
        if total:
            self.total = total
        if fields:
            self.fields = fields

    def check(self) -> None:
        """Stop here if another run owns the job, it was cancelled, or it ran late."""
        if self.fenced.is_set():
            raise Fenced(self.job_id)
        if self.cancel.is_set():
            raise JobCancelled(self.job_id)
        self.check_deadline()

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"ran past timeout_s={self.request['timeout_s']}")

    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        """Progress published and cancel requests caught while the block runs."""
        monitor = self.monitor()
        monitor.watch(self)
        try:
            yield
        finally:
            monitor.unwatch(self)

    # -- writes, all fenced by the run's token ------------------------------------------

    def check_fence(self) -> None:
        """Before writing an object: stop if another run owns the job now, so a run
        that lost its job does not overwrite the winner's files (it narrows the window
        to one round trip; keys are the same, and the bytes too on the same device)."""
        if self.store.token(self.job_id) != self.token:
            self._lost()

    def emit(self, event: EventType, data: dict[str, Any], **changes: Unpack[Changes]) -> None:
        """An event, with the record changed beside it."""
        with self.lock:
            if not self._apply({**self.record, **changes}, [(event, data)]).ok:
                self._lost()

    def publish_progress(self, step: int, preview: str | None = None) -> bool:
        """A progress event, unless the watched block has ended meanwhile (the job's
        own events follow it, and no progress event may come after them). A preview
        rides on the event only: the record's ``progress`` stays small."""
        fields = {"step": step, "total": self.total, **self.fields}
        # A training's progress carries its phase, loss and rate besides (``fields``).
        progress = cast(Progress, fields)
        data = fields if preview is None else {**fields, "preview": preview}
        with self.lock:
            if self.ended:
                return False
            if not self._apply(
                {**self.record, "progress": progress}, [(EventType.PROGRESS, data)]
            ).ok:
                self._lost()
            return True

    def succeed(
        self,
        outputs: Sequence[Output],
        timings: dict[str, int],
        events: Sequence[tuple[EventType, dict[str, Any]]] = (),
    ) -> Status | None:
        """The success write; ``events`` go just before the terminal one, in the same
        compare-and-set."""
        return self.finish(Status.SUCCEEDED, outputs=outputs, timings=timings, events=events)

    def finish(
        self,
        status: Status,
        *,
        error: ErrorInfo | None = None,
        outputs: Sequence[Output] | None = None,
        timings: dict[str, int] | None = None,
        events: Sequence[tuple[EventType, dict[str, Any]]] = (),
    ) -> Status | None:
        """The terminal write; None when another run owns the job now."""
        finished = now_iso()
        created = parse_iso(self.record["created_at"]).timestamp()
        assert self.record["started_at"] is not None  # set by the start
        started = parse_iso(self.record["started_at"]).timestamp()
        all_timings = {
            "queued_ms": _ms(started - created),
            **(timings or {}),
            "total_ms": _ms(parse_iso(finished).timestamp() - created),
        }
        with self.lock:
            record: Record = {
                **self.record,
                "status": status,
                "finished_at": finished,
                "error": error,
                "timings": all_timings,
                "progress": self.record["progress"].copy(),
            }
            if status is Status.SUCCEEDED:
                record["progress"] = {"step": self.total, "total": self.total}
            if outputs is not None:
                record["outputs"] = list(outputs)
            out = self._apply(record, [*events, terminal_event(record)])
            if not out.ok:
                log.warning("job %s: %s not recorded (%s)", self.job_id, status, out.reason)
                return None
        self.metrics.job_ended(self.request["model"], status.value, error, all_timings)
        log.info("job %s %s", self.job_id, status.value)
        return status

    def _apply(
        self,
        record: Record,
        events: list[tuple[EventType, dict[str, Any]]],
    ) -> Outcome:
        """The one fenced write (``lock`` held): the job's record becomes ``record`` and the
        events are appended, only if this run's token is still the job's."""
        out = self.store.apply(
            self.job_id,
            allowed=Status.RUNNING.value,
            token=self.token,
            record=record,
            events=events,
        )
        if out.ok:
            self.record = record
        return out

    def _lost(self) -> None:
        self.fenced.set()
        raise Fenced(self.job_id)


#: The monitor's wait on a run's cancel list until the run's first progress is published.
FIRST_BLOCK_S = 0.02


class Monitor(threading.Thread):
    """Beside the device loop of whichever run is watched (one at a time): publishes
    its throttled progress, and turns a cancel request (pushed to the job's cancel
    list) into the run's cancel flag at once.

    One long-lived thread per worker process, not one per job: a thread and a Redis
    connection per job cost milliseconds of GIL and scheduler time at every job's
    start, which a queue of short jobs pays in full. It blocks on the watched job's
    cancel list for at most ``block_s``, so it moves to the next job within that.
    """

    def __init__(self, progress_interval_s: float, preview_interval_s: float = 1.0) -> None:
        super().__init__(name="atelier-monitor", daemon=True)
        self.interval_s = progress_interval_s
        self.preview_interval_s = preview_interval_s
        self._guard = threading.Lock()
        self._run: Run | None = None
        self._wake = threading.Event()
        self.block_s = min(max(progress_interval_s, 0.05), 0.25)

    def watch(self, run: Run) -> None:
        with self._guard:
            self._run = run
        self._wake.set()

    def unwatch(self, run: Run) -> None:
        # No wait: the device goes to the next job while this thread may still sit in
        # BLPOP on this job's list for up to block_s.
        with run.lock:
            run.ended = True
        with self._guard:
            if self._run is run:
                self._run = None

    def _current(self) -> Run | None:
        with self._guard:
            return self._run

    def run(self) -> None:
        watched: Run | None = None
        sent, last_emit, last_preview = 0, 0.0, 0.0
        while True:
            run = self._current()
            if run is None:
                self._wake.wait()
                self._wake.clear()
                continue
            if run is not watched:
                watched, sent, last_emit, last_preview = run, 0, 0.0, 0.0
            try:
                # Blocks up to block_s; returns at once when a cancel is pushed. Until a
                # run's first progress is out, in short waits: a job of well under a
                # second gets its progress (and its preview) too.
                block = self.block_s if sent else min(self.block_s, FIRST_BLOCK_S)
                if run.store.wait_for_cancel(run.job_id, block):
                    run.cancel.set()
                step = run.step
                now = time.monotonic()
                # (A training's step starts again at each phase: any change counts.)
                if step != sent and now - last_emit >= self.interval_s:
                    # The picture is made here, off the denoising loop, at most one
                    # per preview interval.
                    picture = None
                    if run.preview is not None and now - last_preview >= self.preview_interval_s:
                        picture = _render(run)
                    if run.publish_progress(step, picture):
                        sent, last_emit = step, now
                        if picture is not None:
                            last_preview = now
            except Fenced:
                self.unwatch(run)
            except Exception:
                log.warning(
                    "job %s: progress update failed",
                    run.job_id,
                    exc_info=True,
                    extra={"job_id": run.job_id},
                )
                time.sleep(self.block_s)


def _render(run: Run) -> str | None:
    """The run's next preview; a preview that fails ends the run's previews, not its
    progress (events never fail a job)."""
    assert run.preview is not None
    try:
        return run.preview.render()
    except Exception:
        log.warning(
            "job %s: preview failed; no more previews for it",
            run.job_id,
            exc_info=True,
            extra={"job_id": run.job_id},
        )
        run.preview = None
        return None


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
