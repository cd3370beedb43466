"""An API replica SIGKILLed under load (case 10): every request that got a 202 ends
terminal, and a client retrying with its ``Idempotency-Key`` on the other replica
gets exactly one job per key, whatever instant the first replica died at."""

from __future__ import annotations

import pytest

from producer.core import keys as K
from producer.core.contract import Status
from tests.faults.submitter import Submitter
from tests.helpers import Rig, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.mark.timeout(120)
def test_an_api_replica_killed_under_load(rig: Rig) -> None:
    rig.worker(["sim-fast"], concurrency=4)
    a, b = rig.api(), rig.api()
    body = {"prompt": "under load", "model": "sim-fast"}
    # Eight clients at once, each sending its requests to A and B in turn.
    submitters = [
        Submitter(
            [f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{b.port}"], 15, body, prefix=f"c{n}-"
        )
        for n in range(8)
    ]
    for s in submitters:
        s.start()
    wait_until(
        lambda: sum(s.accepted_count() for s in submitters) >= 40,
        60,
        interval=0.01,
        message=lambda: f"40 jobs accepted; {sum(s.accepted_count() for s in submitters)} are",
    )
    a.kill()
    accepted: dict[str, str] = {}
    for s in submitters:
        accepted.update(s.finish(timeout=90))
    assert len(accepted) == 8 * 15
    assert any(
        "ConnectError" in f or "RemoteProtocolError" in f or "ReadError" in f
        for s in submitters
        for f in s.failures
    )  # A died with requests in flight

    client = rig.client()
    jobs = list(accepted.values())
    assert len(set(jobs)) == len(jobs)
    for s in submitters:  # one key, one job: every replay answered the same id
        assert {(k, accepted[k]) for k, _ in s.answers} == set(s.answers)
    records = rig.wait_terminal(client, jobs, timeout=90)
    bad = {
        j: (r["status"], r["error"]) for j, r in records.items() if r["status"] != Status.SUCCEEDED
    }
    assert not bad, bad
    counts = rig.terminal_counts()
    assert {counts[j] for j in jobs} == {1}
    # No record outside the answered ones: a replica that died between its writes
    # left nothing that runs (a message without a record is dropped by the worker).
    r = client.store.redis
    records_in_redis = {k.decode().removeprefix(K.JOB) for k in r.scan_iter(f"{K.JOB}*")}
    assert records_in_redis == set(jobs)
    assert r.zcard(K.queued_index_key("sim-fast")) == 0


@pytest.mark.timeout(60)
def test_a_replica_killed_between_key_and_enqueue_strands_nothing(rig: Rig) -> None:
    """The narrow instant of case 10, made wide: replica A's broker stalls (a listener
    that never answers), so A is caught mid-submit and SIGKILLed there. The client's
    retry with the same ``Idempotency-Key`` on replica B must get its job, not a 409
    "in progress" for as long as the key lives."""
    import socket

    import httpx

    rig.worker()
    b = rig.api()
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        stalled = f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0"
        a = rig.api(broker_url=stalled)
        headers = {"Authorization": "Bearer fault-key", "Idempotency-Key": "stranded"}
        body = {"prompt": "retried elsewhere", "model": "sim"}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"http://127.0.0.1:{a.port}/v1/jobs", json=body, headers=headers, timeout=1.5
            )
        a.kill()
    resp = httpx.post(f"http://127.0.0.1:{b.port}/v1/jobs", json=body, headers=headers, timeout=30)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    again = httpx.post(f"http://127.0.0.1:{b.port}/v1/jobs", json=body, headers=headers, timeout=30)
    assert again.status_code == 202 and again.json()["id"] == job_id
    assert again.headers["idempotent-replayed"] == "true"
    client = rig.client()
    assert client.wait(job_id, timeout=30)["status"] == Status.SUCCEEDED
    r = client.store.redis
    assert {k.decode().removeprefix(K.JOB) for k in r.scan_iter(f"{K.JOB}*")} == {job_id}
