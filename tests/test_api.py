"""The HTTP API, served by real uvicorn (``atelier api``) and driven by httpx."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import connect_sse
from pydantic import TypeAdapter

from producer.api import key_id
from producer.core import keys as K
from producer.core.contract import Output, RecordView
from producer.jobs.broker import queue_depth
from tests.api_rig import KEY_A, PROMPT, A, B, C, api_env, job_count
from tests.helpers import Stack, generation_queues, wait_until
from tests.servers import Process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api_server_env(stack: Stack) -> dict[str, str]:
    return api_env(stack)


@pytest.fixture(scope="module")
def api(api_server: Process) -> Iterator[httpx.Client]:
    """An HTTP client of the module's API process (tests/conftest.py: ``api_server``)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{api_server.port}", timeout=30) as client:
        yield client


@pytest.fixture
def r(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.settings.redis_url)
    yield client
    client.close()


def wait_status(
    api: httpx.Client, job_id: str, headers: dict[str, str], statuses: set[str], timeout: float = 60
) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def reached() -> dict[str, Any] | None:
        seen[:] = [api.get(f"/v1/jobs/{job_id}", headers=headers).json()]
        return seen[0] if seen[0]["status"] in statuses else None

    return wait_until(
        reached, timeout, interval=0.1, message=lambda: f"{job_id} is still {seen[0]['status']}"
    )


def test_openapi_describes_every_route(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}/events", "get"),
        ("/v1/jobs/{job_id}/cancel", "post"),
        ("/v1/models", "get"),
        ("/v1/queues", "get"),
        ("/v1/workers", "get"),
        ("/v1/files/{key}", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], path
    body = paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in body["properties"] and body["additionalProperties"] is False
    assert "202" in paths["/v1/jobs"]["post"]["responses"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_submit_poll_and_outputs(api: httpx.Client) -> None:
    res = api.post(
        "/v1/jobs", headers=A, json={"prompt": PROMPT, "seed": 7, "metadata": {"order": 1}}
    )
    assert res.status_code == 202, res.text
    doc = res.json()
    assert res.headers["location"] == f"/v1/jobs/{doc['id']}"
    assert doc["status"] in {"queued", "running"} and "owner" not in doc
    done = wait_status(api, doc["id"], A, {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["request"]["seed"] == 7 and done["metadata"] == {"order": 1}
    assert len(done["outputs"]) == 1 and done["outputs"][0]["url"].startswith("http")
    assert done["webhook_deliveries"] == [] and done.get("position") is None
    # The wire is the contract's typed record, key for key: no field it does not name,
    # none it requires missing, every value of its type.
    pairs: list[tuple[Any, Any]] = [
        (RecordView, doc),
        (RecordView, done),
        (Output, done["outputs"][0]),
    ]
    for typed, value in pairs:
        TypeAdapter(typed).validate_python(value, strict=False)
        assert typed.__required_keys__ <= set(value), typed
        assert set(value) <= typed.__required_keys__ | typed.__optional_keys__, typed


def test_auth_failures(api: httpx.Client) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic a2V5"},
        {"Authorization": "Bearer not-a-key"},
    ):
        res = api.get("/v1/models", headers=headers)
        assert res.status_code == 401, headers
        assert res.headers["www-authenticate"] == "Bearer"
        assert res.json()["error"]["code"] == "unauthorized"
    # A key configured by its sha256 works; only admin keys list workers.
    assert api.get("/v1/models", headers=C).status_code == 200
    res = api.get("/v1/workers", headers=B)
    assert res.status_code == 403 and res.json()["error"]["code"] == "forbidden"
    workers = api.get("/v1/workers", headers=A).json()["workers"]
    assert any("tiny-sdxl" in w["models"] and w["state"] in {"idle", "busy"} for w in workers)
    # Operations routes need no key (probes and scrapers).
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}


def test_a_job_is_invisible_to_other_keys(api: httpx.Client, r: redis.Redis) -> None:
    doc = api.post("/v1/jobs", headers=A, json={"prompt": PROMPT, "model": "tiny-idle"}).json()
    jid = doc["id"]
    assert r.hget(K.job_key(jid), "status") == b"queued"
    for method, path in [
        ("GET", f"/v1/jobs/{jid}"),
        ("GET", f"/v1/jobs/{jid}/events"),
        ("POST", f"/v1/jobs/{jid}/cancel"),
    ]:
        res = api.request(method, path, headers=B)
        assert res.status_code == 404, (method, path)
        assert res.json()["error"]["code"] == "not_found"
    # B's cancel did nothing; A still sees it queued, with its position.
    mine = api.get(f"/v1/jobs/{jid}", headers=A).json()
    assert mine["status"] == "queued" and isinstance(mine["position"], int)
    raw = r.hget(K.job_key(jid), "doc")
    assert raw is not None
    assert json.loads(raw)["owner"] == key_id(hashlib.sha256(KEY_A.encode()).hexdigest())
    assert api.post(f"/v1/jobs/{jid}/cancel", headers=A).json()["status"] == "cancelled"


def test_refusals_have_one_shape_and_write_nothing(
    api: httpx.Client, r: redis.Redis, stack: Stack
) -> None:
    broker = redis.Redis.from_url(stack.settings.effective_broker_url)
    before = (job_count(r), queue_depth(broker, "tiny-sdxl"), queue_depth(broker, "tiny-idle"))
    res = api.post(
        "/v1/jobs",
        headers=A,
        content=b"{not json",
        params={},
    )
    assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_json"
    res = api.post(
        "/v1/jobs", headers=A, json={"prompt": PROMPT, "width": 65, "steps": 0, "colour": "red"}
    )
    assert res.status_code == 422
    err = res.json()["error"]
    assert err["code"] == "invalid_request"
    assert {f["field"] for f in err["fields"]} == {"width", "steps", "colour"}
    res = api.post("/v1/jobs", headers=A, json={"prompt": PROMPT, "model": "nope"})
    assert res.status_code == 422 and res.json()["error"]["code"] == "unknown_model"
    res = api.post(
        "/v1/jobs", headers=A, json={"prompt": PROMPT, "webhook": "https://10.0.0.1/hook"}
    )
    assert res.status_code == 422
    assert res.json()["error"]["fields"][0]["field"] == "webhook"
    big = json.dumps({"prompt": PROMPT, "metadata": {"x": "y" * 70000}})
    res = api.post("/v1/jobs", headers=A, content=big)
    assert res.status_code == 413 and res.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(20):
            yield b" " * 8192

    res = api.post("/v1/jobs", headers=A, content=chunks())
    assert res.status_code == 413
    res = api.get("/v1/jobs/nope/events", headers={**A, "Last-Event-ID": "bogus"})
    assert res.status_code == 400 and res.json()["error"]["fields"][0]["field"] == "Last-Event-ID"
    assert api.get("/v1/nowhere", headers=A).json()["error"]["code"] == "not_found"
    after = (job_count(r), queue_depth(broker, "tiny-sdxl"), queue_depth(broker, "tiny-idle"))
    broker.close()
    assert after == before


def test_idempotency_key(api: httpx.Client, r: redis.Redis, stack: Stack) -> None:
    broker = redis.Redis.from_url(stack.settings.effective_broker_url)
    depth = queue_depth(broker, "tiny-idle")
    body = {"prompt": PROMPT, "model": "tiny-idle", "seed": 1}
    h = {**A, "Idempotency-Key": "order-42"}
    first = api.post("/v1/jobs", headers=h, json=body)
    again = api.post("/v1/jobs", headers=h, json=dict(reversed(list(body.items()))))
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = api.post("/v1/jobs", headers=h, json={**body, "seed": 2})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    # Keys are per API key: B's "order-42" is another job.
    theirs = api.post("/v1/jobs", headers={**B, "Idempotency-Key": "order-42"}, json=body)
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
    assert queue_depth(broker, "tiny-idle") == depth + 2
    broker.close()
    for doc, key in ((first.json(), A), (theirs.json(), B)):
        api.post(f"/v1/jobs/{doc['id']}/cancel", headers=key)


def test_queue_positions_and_queue_report(api: httpx.Client) -> None:
    low = api.post(
        "/v1/jobs", headers=A, json={"prompt": PROMPT, "model": "tiny-idle", "priority": 1}
    ).json()
    high = api.post(
        "/v1/jobs", headers=A, json={"prompt": PROMPT, "model": "tiny-idle", "priority": 8}
    ).json()
    mid = api.post(
        "/v1/jobs", headers=A, json={"prompt": PROMPT, "model": "tiny-idle", "priority": 5}
    ).json()
    pos = {
        name: api.get(f"/v1/jobs/{d['id']}", headers=A).json()["position"]
        for name, d in (("low", low), ("high", high), ("mid", mid))
    }
    assert pos["high"] < pos["mid"] < pos["low"]
    queues = generation_queues(api.get("/v1/queues", headers=B).json()["queues"])
    idle = queues["tiny-idle"]
    assert idle["queued"] >= 3 and idle["depth"] >= 3 and idle["oldest_age_s"] >= 0
    assert idle["queue"] == "atelier.tiny-idle"
    # Cancelling takes a job out of the queued count at once.
    api.post(f"/v1/jobs/{high['id']}/cancel", headers=A)
    assert api.get(f"/v1/jobs/{mid['id']}", headers=A).json()["position"] == pos["mid"] - 1
    for d in (low, mid):
        api.post(f"/v1/jobs/{d['id']}/cancel", headers=A)
    assert (
        generation_queues(api.get("/v1/queues", headers=B).json()["queues"])["tiny-idle"]["queued"]
        == idle["queued"] - 3
    )


def test_cancel_states(api: httpx.Client) -> None:
    doc = api.post("/v1/jobs", headers=A, json={"prompt": PROMPT, "steps": 2}).json()
    done = wait_status(api, doc["id"], A, {"succeeded", "failed"})
    assert done["status"] == "succeeded"
    res = api.post(f"/v1/jobs/{doc['id']}/cancel", headers=A)
    assert res.status_code == 409 and res.json()["error"]["code"] == "job_finished"
    queued = api.post("/v1/jobs", headers=A, json={"prompt": PROMPT, "model": "tiny-idle"})
    jid = queued.json()["id"]
    assert api.post(f"/v1/jobs/{jid}/cancel", headers=A).json()["status"] == "cancelled"
    assert api.post(f"/v1/jobs/{jid}/cancel", headers=A).status_code == 200  # idempotent


def test_metrics_count_requests(api: httpx.Client) -> None:
    api.get("/v1/models", headers=A)
    text = api.get("/metrics").text
    assert 'atelier_api_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert "atelier_api_request_duration_seconds_bucket" in text


# -- server-sent events ---------------------------------------------------------------


def read_sse(
    api: httpx.Client,
    jid: str,
    headers: dict[str, str],
    limit: int | None = None,
    last_id: str | None = None,
) -> list[dict[str, Any]]:
    h = dict(headers)
    if last_id:
        h["Last-Event-ID"] = last_id
    got: list[dict[str, Any]] = []
    with connect_sse(api, "GET", f"/v1/jobs/{jid}/events", headers=h) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            # No event without data: the "retry:" field comes with the first event.
            assert sse.data, sse
            if not got:
                assert sse.retry == 2000
            ev = json.loads(sse.data)
            assert sse.id == ev["id"] and sse.event == ev["type"]
            got.append(ev)
            if limit is not None and len(got) >= limit:
                break
    return got


def test_sse_streams_the_whole_log_and_ends(api: httpx.Client) -> None:
    jid = api.post("/v1/jobs", headers=A, json={"prompt": PROMPT, "steps": 8}).json()["id"]
    events = read_sse(api, jid, A)  # returns only because the stream ended
    types = [e["type"] for e in events]
    assert types[0] == "job.queued" and types[1] == "job.started"
    assert types[-1] == "job.succeeded" and "job.output" in types
    assert [e["id"] for e in events] == sorted(
        [e["id"] for e in events], key=lambda i: tuple(map(int, i.split("-")))
    )
    assert events[-1]["data"]["job"]["status"] == "succeeded"


def test_sse_reconnects_see_every_event_exactly_once(api: httpx.Client, stack: Stack) -> None:
    jid = api.post("/v1/jobs", headers=A, json={"prompt": PROMPT, "steps": 60}).json()["id"]
    seen: list[dict[str, Any]] = []
    last = None
    reconnects = 0
    while not seen or seen[-1]["type"] not in {"job.succeeded", "job.failed"}:
        batch = read_sse(api, jid, A, limit=3 if reconnects < 3 else None, last_id=last)
        if reconnects < 3:
            assert seen or batch[0]["type"] == "job.queued"
            reconnects += 1
        seen += batch
        last = seen[-1]["id"]
    assert reconnects == 3
    # mid-job: the third reconnect came before the end
    assert sum(e["type"] == "job.progress" for e in seen[9:]) >= 1
    full = stack.client().store.events(jid, count=10_000)
    assert [e["id"] for e in seen] == [e["id"] for e in full]
    assert len({e["id"] for e in seen}) == len(seen)


def test_sse_retry_comes_in_the_first_event_frame(api: httpx.Client) -> None:
    jid = api.post("/v1/jobs", headers=A, json={"prompt": PROMPT, "model": "tiny-idle"}).json()[
        "id"
    ]
    with api.stream("GET", f"/v1/jobs/{jid}/events", headers=A) as res:
        lines = res.iter_lines()
        assert next(lines) == "retry: 2000"
        assert next(lines).startswith("id: ")
        assert next(lines) == "event: job.queued"
    with connect_sse(api, "GET", f"/v1/jobs/{jid}/events", headers=A) as source:
        first = next(source.iter_sse())
        assert first.event == "job.queued" and first.data and first.retry == 2000
    api.post(f"/v1/jobs/{jid}/cancel", headers=A)


def test_sse_heartbeats_while_queued_then_cancel_ends_it(api: httpx.Client) -> None:
    jid = api.post("/v1/jobs", headers=A, json={"prompt": PROMPT, "model": "tiny-idle"}).json()[
        "id"
    ]
    lines: list[str] = []
    with api.stream("GET", f"/v1/jobs/{jid}/events", headers=A) as res:
        t0 = time.monotonic()
        cancelled = False
        for line in res.iter_lines():
            lines.append(line)
            if not cancelled and lines.count(": keep-alive") >= 2:
                assert time.monotonic() - t0 < 10
                with httpx.Client(base_url=str(api.base_url)) as other:
                    other.post(f"/v1/jobs/{jid}/cancel", headers=A)
                cancelled = True
    assert lines.count(": keep-alive") >= 2
    assert "event: job.cancelled" in lines  # and the stream ended by itself
