"""A run that outlives its visibility timeout (case 9): the message goes to a second
worker while the first run is still alive; the fence lets one run, and only one,
produce the outcome.

The first worker is frozen with SIGSTOP mid-denoise (a stalled GPU, a long GC or VM
pause: the process is alive but silent) for longer than the visibility timeout, and
thawed with SIGCONT after the second run has finished the job.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from producer.contract import EventType, Status
from tests.faults.conftest import Rig, assert_one_outcome, manifest, stored_files, wait_for_event

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.mark.timeout(90)
def test_a_run_past_the_visibility_timeout_cannot_make_a_second_outcome(rig: Rig) -> None:
    # A run takes ~1 s, well within the visibility timeout: only the frozen one
    # outlives it.
    values = {"visibility_timeout_s": 3, "max_attempts": 3}
    workers = [rig.worker(["sim-mid"], wait=False, **values) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    client = rig.client(**values)
    job_id = client.submit(prompt="outlives its visibility timeout", model="sim-mid")
    wait_for_event(client, job_id, EventType.PROGRESS)
    first_run = client.get(job_id)
    stale = rig.worker_of(first_run, workers)
    [second] = [w for w in workers if w is not stale]
    stale.signal(signal.SIGSTOP)
    try:
        # The visibility timeout passes; the second worker's restore sweep puts the
        # message back and takes it: a second, concurrent run of the same job.
        record = client.wait(job_id, timeout=40)
    finally:
        stale.signal(signal.SIGCONT)
    assert record["status"] == Status.SUCCEEDED, record
    assert record["attempts"] == 2
    assert record["worker"].endswith(f":{second.pid}")
    terminal_log = client.store.events(job_id, count=10_000)

    # The stale run wakes up mid-denoise and goes on: its next write (a progress
    # event, or the fence check before its first upload, whichever comes first: the
    # simulated GPU catches up on its missed steps at once) is refused, so it stops
    # there and writes nothing more.
    deadline = time.monotonic() + 20
    while not re.search(r"job \w+: fenced during (generation|upload)", stale.log()):
        assert time.monotonic() < deadline, stale.log()[-3000:]
        time.sleep(0.1)
    time.sleep(1.0)
    assert client.get(job_id) == record  # the terminal record never changed
    assert client.store.events(job_id, count=10_000) == terminal_log  # no event after it
    log = assert_one_outcome(rig, client, job_id)
    starts = [e for e in log if e["type"] == EventType.STARTED]
    assert [e["data"]["worker"] for e in starts] == [first_run["worker"], record["worker"]]
    assert rig.terminal_counts() == {job_id: 1}
    assert stored_files(rig.out, job_id) == ["0.png", "manifest.json"]
    assert manifest(rig.out, job_id)["worker"] == record["worker"]
    assert stale.proc is not None and stale.proc.poll() is None  # alive, serving on
