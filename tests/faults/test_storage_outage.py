"""The S3 endpoint goes away for 10 s during uploads (case 4): uploads are retried in
place, every job succeeds, and none is ``succeeded`` before its objects exist."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from typing import Any

import boto3
import pytest

from producer.core import keys as K
from producer.core.contract import Record, Status, parse_iso
from tests.helpers import Rig, wait_until, worker_env
from tests.servers import AWS_ENV, Process, S3Server, free_port

pytestmark = [pytest.mark.slow, pytest.mark.faults]

BUCKET = "atelier-faults"


class SucceededWatcher(threading.Thread):
    """Follows the global event stream; at each ``job.succeeded`` it reads the job's
    objects straight from the S3 server (not through the relay) at once: each must
    exist with the bytes the record names."""

    def __init__(self, redis: Any, s3: Any) -> None:
        super().__init__(name="watcher", daemon=True)
        self.redis, self.s3 = redis, s3
        self.checked: set[str] = set()
        self.problems: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        last = "0-0"
        while not self.stopping.is_set():
            res: Any = self.redis.xread({K.GLOBAL_EVENTS: last}, block=200, count=100)
            for _, entries in res or []:
                for eid, fields in entries:
                    last = eid
                    if fields[b"type"] != b"job.succeeded":
                        continue
                    import json

                    job = json.loads(fields[b"data"])["job"]
                    for out in job["outputs"]:
                        try:
                            body = self.s3.get_object(Bucket=BUCKET, Key=out["key"])["Body"]
                            data = body.read()
                        except Exception as exc:  # noqa: BLE001 - recorded, asserted
                            self.problems.append(f"{job['id']}: {out['key']}: {exc}")
                            continue
                        if hashlib.sha256(data).hexdigest() != out["sha256"]:
                            self.problems.append(f"{job['id']}: {out['key']}: other bytes")
                    self.checked.add(job["id"])


def relay_process(rig: Rig, s3_port: int) -> Process:
    """A TCP relay in front of the S3 server, which the test kills and restarts."""
    port = free_port()
    return Process(
        [sys.executable, "-m", "tests.faults.relay", str(port), str(s3_port)],
        worker_env(rig.values()),
        rig.tmp / "relay.log",
        ready=b"relay ready",
        port=port,
    )


def ten_seconds_down(relay: Process) -> tuple[float, float]:
    """The relay killed (connections refused, those in flight reset) for 10 s: when S3
    went and when it came back."""
    relay.kill()
    down_at = time.time()
    time.sleep(10)
    relay.start()
    return down_at, time.time()


def every_job_succeeded_once(
    rig: Rig, client: Any, jobs: list[str], watcher: SucceededWatcher
) -> dict[str, Record]:
    """Every job succeeded, its objects there when it did, in one attempt, once."""
    records = rig.wait_terminal(client, jobs, timeout=90)
    bad = {
        j: (r["status"], r["error"]) for j, r in records.items() if r["status"] != Status.SUCCEEDED
    }
    assert not bad, bad
    wait_until(
        lambda: len(watcher.checked) >= len(jobs),
        5,
        interval=0.05,
        message=lambda: (
            f"the watcher checked all {len(jobs)} jobs; it checked {len(watcher.checked)}"
        ),
    )
    assert watcher.problems == []
    assert {r["attempts"] for r in records.values()} == {1}  # retried in place
    counts = rig.terminal_counts()
    assert {counts[j] for j in jobs} == {1}
    return records


@pytest.mark.timeout(120)
def test_s3_down_for_ten_seconds_during_uploads(rig: Rig) -> None:
    for k, v in AWS_ENV.items():
        import os

        os.environ.setdefault(k, v)
    s3_server = S3Server().start()
    relay = None
    watcher = None
    try:
        direct = boto3.client("s3", endpoint_url=s3_server.endpoint)
        direct.create_bucket(Bucket=BUCKET)
        relay = relay_process(rig, s3_server.port)
        relay.start()
        values: dict[str, Any] = {
            "storage_url": f"s3://{BUCKET}/outputs",
            "s3_endpoint_url": f"http://127.0.0.1:{relay.port}",
            "storage_retry_s": 40,
        }
        rig.worker(**values)
        client = rig.client(**values)
        watcher = SucceededWatcher(client.store.redis, direct)
        watcher.start()
        jobs = [
            client.submit(prompt=f"upload {i}", width=512, height=512, num_images=2)
            for i in range(16)
        ]
        wait_until(
            lambda: len(watcher.checked) >= 2,
            30,
            interval=0.02,
            message="two jobs succeeded before the outage",
        )
        down_at, up_at = ten_seconds_down(relay)
        records = every_job_succeeded_once(rig, client, jobs, watcher)
        # At least one job was under way when S3 went and ended after it came back.
        spanning = [
            r
            for r in records.values()
            if parse_iso(str(r["started_at"])).timestamp() < down_at
            and parse_iso(str(r["finished_at"])).timestamp() > up_at
        ]
        assert spanning, [(r["started_at"], r["finished_at"]) for r in records.values()]
    finally:
        if watcher is not None:
            watcher.stopping.set()
            watcher.join(5)  # before the rig closes the Redis client it reads with
        if relay is not None:
            relay.stop()
        s3_server.stop()
