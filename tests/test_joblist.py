"""The job list (``GET /v1/jobs``, ``Client.list``, ``atelier jobs``) and the signed URLs
of ``file://`` outputs, on a private redis-server with a real API and a simulated-GPU
worker writing to a local folder."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from pydantic import TypeAdapter

from producer.api import key_id
from producer.api.files import FileLinks
from producer.client import new_job_id
from producer.core import keys as K
from producer.core.contract import Kind, RecordView, Status, new_record, now_iso, terminal_event
from producer.core.errors import InvalidRequest
from producer.core.settings import Settings
from producer.jobs.joblist import JobList
from producer.jobs.store import JobStore
from tests.helpers import Rig, wait_until, worker_env
from tests.records import changed
from tests.servers import RedisServer, Worker

pytestmark = pytest.mark.slow

KEY_A, KEY_B, KEY_C = "list-key-a-0123456789", "list-key-b-0123456789", "list-key-c-0123"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
C = {"Authorization": f"Bearer {KEY_C}"}
OWNER_A = key_id(hashlib.sha256(KEY_A.encode()).hexdigest())
OWNER_B = key_id(hashlib.sha256(KEY_B.encode()).hexdigest())
SECRET = "test-file-url-secret-0123456789abcdef"


@dataclass
class Env:
    rig: Rig
    api: httpx.Client
    store: JobStore
    worker: Worker


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("joblist")
    server = RedisServer(tmp / "redis").start()
    rig = Rig(tmp, server, tmp / "models")  # simulated GPUs: no model to build
    store = JobStore.from_url(server.url)
    try:
        worker = rig.worker(["sim"], wait=False)  # starts while the API does
        proc = rig.api(api_keys=f"{KEY_A},{KEY_B},{KEY_C}", file_url_secret=SECRET)
        with httpx.Client(base_url=f"http://127.0.0.1:{proc.port}", timeout=30) as api:
            yield Env(rig, api, store, worker)
    finally:
        store.redis.close()
        rig.close()
        server.stop()


def add_job(
    store: JobStore,
    owner: str | None,
    model: str,
    status: Status,
    created: datetime,
    kind: Kind = Kind.GENERATE,
    legacy: bool = False,
) -> str:
    """A job written as the API and a worker would write it (through the store's
    transitions), created at ``created``; ``legacy``: a record from before kinds."""
    created_at = created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    request: Any = {"model": model, "prompt": "a lighthouse", "steps": 2, "priority": 5}
    record: dict[str, Any] = dict(new_record(new_job_id(), request, created_at, owner, kind))
    if legacy:
        del record["kind"]
    assert store.create(record).ok  # type: ignore[arg-type]
    job_id = record["id"]
    if status is Status.QUEUED:
        return job_id
    snap = store.load(job_id)
    running = changed(snap.record, status=Status.RUNNING.value, started_at=now_iso())
    assert store.apply(
        job_id, allowed="queued", token=snap.token, record=running, new_token=f"run-{job_id}"
    ).ok
    ended = changed(running, status=status.value, finished_at=now_iso())
    assert store.apply(
        job_id,
        allowed="running",
        token=f"run-{job_id}",
        record=ended,
        events=[terminal_event(ended)],
    ).ok
    return job_id


def pages(api: httpx.Client, headers: dict[str, str], **params: Any) -> list[list[str]]:
    """Every page's job ids, following next_cursor to the end."""
    out: list[list[str]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        res = api.get("/v1/jobs", params=query, headers=headers)
        assert res.status_code == 200, res.text
        body = res.json()
        out.append([r["id"] for r in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return out
        assert len(out) < 50, "the pages do not end"


def flat(pages: list[list[str]]) -> list[str]:
    return [job for page in pages for job in page]


Planned = list[tuple[str, str, Status]]


def fill(store: JobStore) -> tuple[Planned, str, list[str]]:
    """A's seven generate jobs (the first a record from before kinds) and one training,
    and two of B's, each a millisecond apart: (A's jobs with model and status, the
    training, B's)."""
    t0 = datetime.now(UTC) - timedelta(seconds=10)
    plan = [
        ("m-one", Status.SUCCEEDED),
        ("m-two", Status.QUEUED),
        ("m-one", Status.FAILED),
        ("m-one", Status.SUCCEEDED),
        ("m-two", Status.SUCCEEDED),
        ("m-one", Status.QUEUED),
        ("m-one", Status.SUCCEEDED),
    ]
    jobs = [
        (add_job(store, OWNER_A, m, s, t0 + timedelta(milliseconds=i), legacy=i == 0), m, s)
        for i, (m, s) in enumerate(plan)
    ]
    trained = add_job(
        store, OWNER_A, "m-one", Status.QUEUED, t0 + timedelta(milliseconds=50), kind=Kind.TRAIN
    )
    theirs = [
        add_job(store, OWNER_B, "m-one", Status.SUCCEEDED, t0 + timedelta(milliseconds=i))
        for i in (3, 60)
    ]
    return jobs, trained, theirs


def check_the_records_are_views(api: httpx.Client) -> None:
    body = api.get("/v1/jobs", params={"limit": 100}, headers=A).json()
    for record in body["data"]:
        TypeAdapter(RecordView).validate_python(record, strict=False)
        assert RecordView.__required_keys__ <= set(record) and "owner" not in record
        assert (record["status"] == "queued") == ("position" in record)
    assert body["data"][-1]["kind"] == "generate"  # the record from before kinds


def check_the_client_and_the_cli(env: Env, jobs: Planned, newest_first: list[str]) -> None:
    """The client and the CLI list the same, by the key's id or by the key."""
    client = env.rig.client()
    assert [r["id"] for r in client.list(owner=OWNER_A, limit=100)["data"]] == newest_first
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "jobs",
            "--key",
            KEY_A,
            "--status",
            "succeeded",
            "--limit",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=worker_env(env.rig.values()),
    )
    assert res.returncode == 0, res.stderr
    page = json.loads(res.stdout)
    everyone = [j for j, _, s in reversed(jobs) if s is Status.SUCCEEDED]
    assert [r["id"] for r in page["data"]] == everyone[:2] and page["next_cursor"]


def test_pages_newest_first_with_filters_for_the_owner_only(env: Env) -> None:
    jobs, trained, theirs = fill(env.store)
    newest_first = [trained] + [j for j, _, _ in reversed(jobs)]

    got = pages(env.api, A, limit=3)
    assert [len(p) for p in got] == [3, 3, 2]
    assert flat(got) == newest_first
    # Two filters at once, one per page.
    want = [j for j, m, s in reversed(jobs) if m == "m-one" and s is Status.SUCCEEDED]
    assert pages(env.api, A, status="succeeded", model="m-one", limit=1) == [[j] for j in want]
    assert flat(pages(env.api, A, status="queued", limit=2)) == [trained] + [
        j for j, _, s in reversed(jobs) if s is Status.QUEUED
    ]
    assert pages(env.api, A, kind="train") == [[trained]]
    # A record from before kinds is a generate job.
    assert flat(pages(env.api, A, kind="generate", limit=100)) == newest_first[1:]
    # Another key sees its own only, and none of A's.
    assert pages(env.api, B) == [theirs[::-1]]

    check_the_records_are_views(env.api)
    check_the_client_and_the_cli(env, jobs, newest_first)


def test_bad_parameters_are_refused_naming_the_field(env: Env) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "done"}, "status"),
        ({"kind": "paint"}, "kind"),
        ({"cursor": "page-2"}, "cursor"),
        ({"model": ""}, "model"),
    ]
    for params, field in cases:
        res = env.api.get("/v1/jobs", params=params, headers=A)
        assert res.status_code == 422, (params, res.text)
        error = res.json()["error"]
        assert error["code"] == "invalid_request"
        assert [f["field"] for f in error["fields"]] == [f"query.{field}"], params
    assert env.api.get("/v1/jobs").status_code == 401
    with pytest.raises(InvalidRequest) as refused:
        env.rig.client().list(limit=0, status="done")
    assert [f["field"] for f in refused.value.fields] == ["status", "limit"]


def test_finished_jobs_leave_the_list_when_their_records_expire(env: Env) -> None:
    url = env.rig.redis.url.rsplit("/", 1)[0] + "/1"  # a database of its own
    r = redis.Redis.from_url(url)
    try:
        store = JobStore(r, result_ttl_s=1)  # the case is about that expiry
        jobs = JobList(store)
        now = datetime.now(UTC)
        old = add_job(store, OWNER_A, "m-one", Status.SUCCEEDED, now)
        live = add_job(store, OWNER_A, "m-one", Status.QUEUED, now + timedelta(milliseconds=1))
        assert [x["id"] for x in jobs.page(OWNER_A)["data"]] == [live, old]
        wait_until(lambda: not r.exists(K.job_key(old)), 5, message="the record expires")
        # Read: pruned on the way, from every set it was in.
        assert [x["id"] for x in jobs.page(OWNER_A, status="succeeded")["data"]] == []
        assert [x["id"] for x in jobs.page(OWNER_A)["data"]] == [live]
        # The live job's 8 sets (each filter given or not) are all that is left.
        members: list[Any] = [r.zrange(k, 0, -1) for k in r.scan_iter(K.JOB_LIST + "*")]
        assert len(members) == 8 and r.zcard(K.JOB_LIST_EXPIRY) == 0
        assert all(len(m) == 1 and m[0].decode().endswith(f":{live}") for m in members)
        # Write: a terminal transition prunes what has expired, unread.
        gone = add_job(store, OWNER_B, "m-two", Status.FAILED, now)
        wait_until(lambda: not r.exists(K.job_key(gone)), 5, message="the record expires")
        add_job(store, OWNER_A, "m-one", Status.CANCELLED, now)
        assert not any(r.exists(K.list_key(OWNER_B, s, "*", "*")) for s in ("*", "failed"))
        assert r.zcard(K.JOB_LIST_EXPIRY) == 1  # the cancelled one, until it expires
    finally:
        r.flushdb()
        r.close()


def served_output(env: Env) -> tuple[str, dict[str, Any]]:
    """A job's file output, served at its URL with no API key, in the list and the event
    stream alike: (the job's id, the output)."""
    env.worker.wait_ready()
    res = env.api.post("/v1/jobs", headers=C, json={"prompt": "a lighthouse", "model": "sim"})
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    done = wait_until(
        lambda: (lambda d: d if d["status"] in {"succeeded", "failed"} else None)(
            env.api.get(f"/v1/jobs/{job_id}", headers=C).json()
        ),
        60,
        message="the job ends",
    )
    assert done["status"] == "succeeded", done
    output = done["outputs"][0]
    base = str(env.api.base_url).rstrip("/")
    assert output["url"].startswith(f"{base}/v1/files/{output['key']}?"), output["url"]
    # No API key needed, nor in the URL; the bytes are the stored ones.
    got = httpx.get(output["url"], timeout=10)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "image/png"
    on_disk = (env.rig.out / output["key"]).read_bytes()
    assert got.content == on_disk and hashlib.sha256(got.content).hexdigest() == output["sha256"]
    assert KEY_C not in output["url"]
    # The list and the event stream carry the same kind of URL.
    listed = env.api.get("/v1/jobs", params={"model": "sim"}, headers=C).json()["data"][0]
    assert listed["outputs"][0]["url"].startswith(f"{base}/v1/files/")
    with env.api.stream("GET", f"/v1/jobs/{job_id}/events", headers=C) as stream:
        frames = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    sent = [f["data"]["output"]["url"] for f in frames if f["type"] == "job.output"]
    assert sent and all(u.startswith(f"{base}/v1/files/") for u in sent)
    assert httpx.get(sent[0], timeout=10).content == on_disk
    return job_id, output


def test_file_outputs_are_served_at_signed_expiring_urls(env: Env) -> None:
    job_id, output = served_output(env)
    base = str(env.api.base_url).rstrip("/")
    links = FileLinks(
        Settings(storage_url=f"file://{env.rig.out}", file_url_secret=SECRET, public_url=base)
    )
    query = parse_qs(urlsplit(output["url"]).query)
    signature = query["signature"][0]
    refusals = {
        # expired (signed by the server's key, a day ago)
        links.url(output["key"], now=time.time() - 2 * 86400): (403, "url_expired"),
        # tampered: another signature, another key, another expiry
        output["url"].replace(signature, ("A" if signature[0] != "A" else "B") + signature[1:]): (
            403,
            "invalid_signature",
        ),
        output["url"].replace(output["key"], f"{job_id}/manifest.json"): (403, "invalid_signature"),
        output["url"].replace(f"expires={query['expires'][0]}", "expires=9999999999"): (
            403,
            "invalid_signature",
        ),
        # signed, but naming nothing under the storage root (dots sent encoded, as
        # httpx would resolve them), or a link out of it
        links.url(f"{job_id}/../../secret.png").replace("..", "%2E%2E"): (404, "not_found"),
        links.url(f"{job_id}/link.png"): (404, "not_found"),
        links.url(f"{job_id}/7.png"): (404, "not_found"),
    }
    (env.rig.tmp / "secret.png").write_bytes(b"not an output")
    (env.rig.out / job_id / "link.png").symlink_to(env.rig.tmp / "secret.png")
    for url, (status, code) in refusals.items():
        res = httpx.get(url, timeout=10)
        assert (res.status_code, res.json()["error"]["code"]) == (status, code), url
    res = httpx.get(output["url"].split("?")[0], timeout=10)
    assert res.status_code == 422 and {f["field"] for f in res.json()["error"]["fields"]} == {
        "query.expires",
        "query.signature",
    }
