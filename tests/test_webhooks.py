"""Webhooks: real dispatcher processes deliver to a real HTTP receiver.

Every signature is checked with the ``standardwebhooks`` package, not our own code.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from producer.core import keys as K
from producer.core.contract import Event, EventType
from producer.core.settings import Settings
from producer.services.webhooks import attempt
from tests.helpers import Stack, wait_until, worker_env
from tests.receiver import Received, Receiver
from tests.servers import Process, dispatcher_process

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"atelier-test-webhook-secret-32by").decode()
PROMPT = "a lighthouse at dusk"


def dispatcher_env(stack: Stack, **extra: Any) -> dict[str, str]:
    return worker_env(
        {
            **stack.values,
            "webhook_secret": SECRET,
            "webhook_retry_schedule_s": "0.3,0.3,0.3",
            "webhook_read_timeout_s": 1.0,
            "webhook_connect_timeout_s": 1.0,
            "webhook_claim_idle_s": 2.0,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as rec:
        yield rec


@pytest.fixture(scope="module")
def dispatcher(stack: Stack, session_dir: Path) -> Iterator[Process]:
    proc = dispatcher_process(dispatcher_env(stack), session_dir / "logs" / "dispatcher.log")
    proc.start()
    yield proc
    proc.stop()


def verify(got: Received) -> dict[str, Any]:
    """The body, after the standardwebhooks package accepted its signature."""
    payload: dict[str, Any] = Webhook(SECRET).verify(got.body, got.headers)
    assert got.headers["webhook-id"] == payload["id"]
    return payload


def submit(stack: Stack, **fields: Any) -> str:
    with stack.client() as client:
        job_id: str = client.submit({"prompt": PROMPT, "steps": 2, **fields})
        return job_id


def deliveries(stack: Stack, job_id: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    store = stack.client().store

    def enough() -> list[dict[str, Any]] | None:
        got = store.deliveries(job_id)
        return got if len(got) >= count else None

    return wait_until(
        enough,
        timeout,
        message=lambda: f"{count} deliveries of {job_id}: {store.deliveries(job_id)}",
    )


def test_completed_webhook_is_signed_and_carries_the_job(
    stack: Stack, receiver: Receiver, dispatcher: Process
) -> None:
    job_id = submit(stack, webhook=receiver.url("/ok"), metadata={"order": 9})
    [got] = receiver.wait_for("/ok", 1)
    event = verify(got)
    assert event["type"] == "job.succeeded" and event["job_id"] == job_id
    assert event["data"]["job"]["status"] == "succeeded"
    assert len(event["data"]["job"]["outputs"]) == 1
    assert event["data"]["metadata"] == {"order": 9}
    # The webhook id is the event's id in the job's log.
    log = stack.client().store.events(job_id)
    assert got.headers["webhook-id"] == log[-1]["id"]
    [d] = deliveries(stack, job_id, 1)
    assert d["outcome"] == "delivered" and d["status"] == 204 and d["attempt"] == 1
    time.sleep(0.5)
    assert len(receiver.at("/ok")) == 1  # only the completed event was asked for


def test_webhook_events_filter(stack: Stack, receiver: Receiver, dispatcher: Process) -> None:
    url = receiver.url("/all")
    job_id = submit(
        stack,
        webhook=url,
        steps=12,
        preview=True,
        webhook_events=["started", "progress", "output", "completed"],
    )
    log = stack.client().wait(job_id, timeout=60)
    assert log["status"] == "succeeded"
    wanted = [
        e
        for e in stack.client().store.events(job_id)
        if e["type"] not in {"job.queued", "job.retrying"}
    ]
    got = receiver.wait_for("/all", len(wanted))
    payloads = [verify(g) for g in got]
    assert sorted(p["id"] for p in payloads) == sorted(e["id"] for e in wanted)
    # The job's log has its previews; its webhooks leave them out.
    assert any("preview" in e["data"] for e in wanted)
    progress = [p for p in payloads if p["type"] == "job.progress"]
    assert progress and not [p for p in progress if "preview" in p["data"]]
    assert {p["type"] for p in payloads} >= {
        "job.started",
        "job.progress",
        "job.output",
        "job.succeeded",
    }
    only_started = submit(stack, webhook=receiver.url("/started"), webhook_events=["started"])
    stack.client().wait(only_started, timeout=60)
    [one] = receiver.wait_for("/started", 1)
    time.sleep(0.5)
    assert verify(one)["type"] == "job.started" and len(receiver.at("/started")) == 1


def test_retry_after_is_honoured(stack: Stack, receiver: Receiver, dispatcher: Process) -> None:
    url = receiver.script("/busy", ("status", 429, {"Retry-After": "2"}), 204)
    job_id = submit(stack, webhook=url)
    first, second = receiver.wait_for("/busy", 2)
    assert second.at - first.at >= 1.8  # the schedule alone would wait ~0.3 s
    assert [d["outcome"] for d in deliveries(stack, job_id, 2)] == ["retry", "delivered"]


def test_gone_stops_and_the_schedule_ends(
    stack: Stack, receiver: Receiver, dispatcher: Process
) -> None:
    gone = submit(stack, webhook=receiver.script("/gone", 410))
    broken = submit(stack, webhook=receiver.script("/broken", 500))
    [d] = deliveries(stack, gone, 1)
    assert d["outcome"] == "failed" and d["status"] == 410
    log = deliveries(stack, broken, 4)  # the first try and three retries
    assert [d["outcome"] for d in log] == ["retry", "retry", "retry", "gave_up"]
    time.sleep(1.5)
    assert len(receiver.at("/gone")) == 1 and len(receiver.at("/broken")) == 4
    assert stack.client().store.redis.zcard(K.WEBHOOK_RETRIES) == 0


def test_redirects_are_not_followed_and_hangs_time_out(
    stack: Stack, receiver: Receiver, dispatcher: Process
) -> None:
    moved = submit(
        stack, webhook=receiver.script("/moved", f"redirect:{receiver.url('/target')}", 204)
    )
    slow = submit(stack, webhook=receiver.script("/slow", "hang:3", 204))
    log = deliveries(stack, moved, 2)
    assert log[0]["status"] == 302 and "redirects are not followed" in log[0]["error"]
    assert log[1]["outcome"] == "delivered"
    assert receiver.at("/target") == []
    log = deliveries(stack, slow, 2, timeout=30)
    assert log[0]["outcome"] == "retry" and "Timeout" in log[0]["error"]
    assert log[0]["duration_ms"] < 2500  # the read timeout (1 s) cut it short
    assert log[1]["outcome"] == "delivered"


# -- the address guard on webhooks ---------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "10.0.0.1",
        "169.254.169.254",
        "[fe80::1]",
        "0.0.0.0",
        "100.64.0.1",
        "[64:ff9b::7f00:1]",
    ],
)
def test_deliveries_to_non_public_addresses_are_refused(receiver: Receiver, host: str) -> None:
    settings = Settings(
        webhook_secret=SECRET,
        allow_http=True,
        egress_allowlist="",
        webhook_connect_timeout_s=1,
        webhook_read_timeout_s=1,
    )
    before = len(receiver.received)
    event: Event = {"id": "1-0", "type": EventType.SUCCEEDED, "job_id": "x", "ts": "t", "data": {}}
    result = attempt(f"http://{host}:{receiver.port}/ssrf", event, settings)
    assert result.outcome == "failed" and (result.error or "").startswith("refused"), result
    assert len(receiver.received) == before


def test_allowlisted_loopback_redirecting_to_loopback_is_not_followed(
    receiver: Receiver,
) -> None:
    settings = Settings(
        webhook_secret=SECRET,
        allow_http=True,
        egress_allowlist="127.0.0.1",
        webhook_connect_timeout_s=1,
        webhook_read_timeout_s=1,
    )
    url = receiver.script("/hop", "redirect:http://127.0.0.1:1/admin")
    event: Event = {"id": "2-0", "type": EventType.SUCCEEDED, "job_id": "x", "ts": "t", "data": {}}
    result = attempt(url, event, settings)
    assert result.outcome == "retry" and result.status == 302
    assert json.loads(receiver.at("/hop")[-1].body)["id"] == "2-0"
