"""Many watchers through one API replica (producer/api/hub.py): real uvicorn, real
redis-server, hundreds of streams read over raw sockets.

Jobs are on ``tiny-idle`` (no worker serves it: they stay queued); their events are
written by the store's own transition (:meth:`JobStore.apply`, what a worker's progress
does) in bursts, and a cancel ends each job with its terminal event.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from producer.core.contract import EventType
from producer.jobs.store import JobStore
from tests.helpers import wait_until, worker_env
from tests.servers import Process, RedisServer, api_process

pytestmark = pytest.mark.slow

KEY = "key-sse-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def api_env(redis_url: str, models_file: str, tmp: Path) -> dict[str, str]:
    # The settings a user has, but no rate limit: hundreds of streams share one key.
    return worker_env(
        {
            "redis_url": redis_url,
            "models_file": models_file,
            "storage_url": f"file://{tmp / 'outputs'}",
            "api_keys": KEY,
            "rate_limit_per_s": 0,
        }
    )


@pytest.fixture(scope="module")
def api_server_env(
    redis_server: RedisServer, models_file: str, session_dir: Path
) -> dict[str, str]:
    return api_env(redis_server.url, models_file, session_dir)


@pytest.fixture(scope="module")
def api(api_server: Process) -> int:
    """The port of the module's API process (tests/conftest.py: ``api_server``)."""
    assert api_server.port is not None
    return api_server.port


def submit(port: int, n: int) -> list[str]:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as h:
        return [
            h.post("/v1/jobs", json={"prompt": "watched", "model": "tiny-idle"}).json()["id"]
            for _ in range(n)
        ]


def burst(
    store: JobStore, job_id: str, n: int, pad: int = 0, chunk: int = 100, pause_s: float = 0.0
) -> None:
    """``n`` progress events in the job's log, ``chunk`` per transition."""
    for start in range(0, n, chunk):
        events = [
            (EventType.PROGRESS, {"step": i, "total": n, "pad": "x" * pad})
            for i in range(start, min(n, start + chunk))
        ]
        assert store.apply(job_id, allowed="queued", events=events).ok
        if pause_s:
            time.sleep(pause_s)


def cancel(port: int, job_ids: list[str]) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as h:
        for jid in job_ids:
            assert h.post(f"/v1/jobs/{jid}/cancel").status_code == 200


def log_ids(store: JobStore, job_id: str) -> list[str]:
    return [e["id"] for e in store.events(job_id, count=100_000)]


class Stream:
    """One ``GET /v1/jobs/{id}/events`` over a raw socket: the ids it got, in order,
    and how it ended (``terminal``: after the job's terminal event; ``cut``: a clean
    end of stream before it)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.ids: list[str] = []
        self.ended: str | None = None
        self.open = asyncio.Event()
        self.cuts = self.refused = 0

    async def read(self, port: int, after: str | None = None, limit: int | None = None) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        resume = f"Last-Event-ID: {after}\r\n" if after else ""
        writer.write(
            f"GET /v1/jobs/{self.job_id}/events HTTP/1.1\r\nHost: t\r\n"
            f"Authorization: Bearer {KEY}\r\n{resume}\r\n".encode()
        )
        status = await reader.readline()
        while await reader.readline() not in (b"\r\n", b""):
            pass
        if b" 503 " in status:  # Redis down: a browser retries after `retry`
            self.ended, self.refused = "refused", self.refused + 1
            writer.close()
            return
        assert b" 200 " in status, status
        self.open.set()
        got = 0
        try:
            while True:
                line = await reader.readline()
                if line in (b"0\r\n", b""):
                    self.ended = "cut" if line else "broken"
                    return
                if line.startswith(b"id: "):
                    self.ids.append(line[4:].strip().decode())
                    got += 1
                elif line.startswith(b"event: job.cancelled"):
                    self.ended = "terminal"
                    return
                if limit is not None and got >= limit:
                    self.ended = "left"
                    return
        finally:
            writer.close()

    async def follow(self, port: int, after: str | None = None) -> None:
        """Read to the end, resuming with ``Last-Event-ID`` after a clean early end."""
        await self.read(port, after)
        while self.ended in ("cut", "refused"):
            if self.ended == "cut":
                self.cuts += 1
            else:
                await asyncio.sleep(0.5)
            await self.read(port, self.ids[-1] if self.ids else after)


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def test_many_streams_on_one_job_and_across_jobs_see_every_event_once_in_order(
    api: int, redis_server: RedisServer
) -> None:
    store = JobStore.from_url(redis_server.url)
    jobs = submit(api, 3)
    # 200 on the first job, 50 on each of the others.
    streams = [Stream(jobs[0]) for _ in range(200)] + [
        Stream(j) for j in jobs[1:] for _ in range(50)
    ]

    async def scenario() -> None:
        tasks = [asyncio.create_task(s.follow(api)) for s in streams]
        await asyncio.wait_for(asyncio.gather(*(s.open.wait() for s in streams)), 60)
        for round_ in range(3):  # interleaved bursts, while the streams are live
            for jid in jobs:
                await asyncio.to_thread(burst, store, jid, 40 + round_, chunk=7)
        await asyncio.to_thread(cancel, api, jobs)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    run_async(scenario())
    full = {jid: log_ids(store, jid) for jid in jobs}
    assert all(len(ids) == 1 + 40 + 41 + 42 + 1 for ids in full.values())
    for s in streams:
        assert s.ids == full[s.job_id]  # every event, once, in order
    assert all(s.ended == "terminal" for s in streams)
    store.redis.close()


def test_a_reconnect_in_the_middle_of_a_burst_loses_nothing(
    api: int, redis_server: RedisServer
) -> None:
    store = JobStore.from_url(redis_server.url)
    [jid] = submit(api, 1)
    cuts = [5 + 7 * i for i in range(20)]  # each stream leaves at its own point

    async def one(cut: int, writing: threading.Event) -> list[str]:
        first = Stream(jid)
        await first.read(api, limit=cut)
        assert first.ended == "left" and writing.is_set()
        again = Stream(jid)
        await again.follow(api, first.ids[-1])  # resumes after the last id it had
        assert again.ended == "terminal"
        return first.ids + again.ids

    async def scenario() -> list[list[str]]:
        writing = threading.Event()

        def write() -> None:
            writing.set()
            burst(store, jid, 600, chunk=5, pause_s=0.005)
            cancel(api, [jid])

        writer = threading.Thread(target=write)
        writer.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(c, writing) for c in cuts)), 90)
        finally:
            writer.join()

    seen = run_async(scenario())
    full = log_ids(store, jid)
    for ids in seen:
        assert ids == full
    store.redis.close()


def test_a_stalled_client_is_cut_off_without_affecting_the_others(
    api: int, redis_server: RedisServer
) -> None:
    store = JobStore.from_url(redis_server.url)
    [jid] = submit(api, 1)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", api))
    stalled.sendall(
        f"GET /v1/jobs/{jid}/events HTTP/1.1\r\nHost: t\r\n"
        f"Authorization: Bearer {KEY}\r\n\r\n".encode()
    )
    others = [Stream(jid) for _ in range(20)]
    n = 3000  # 2 KB each: ~6 MB, far past the socket buffers and SSE_QUEUE_MAX (1000)

    async def scenario() -> float:
        tasks = [asyncio.create_task(s.follow(api)) for s in others]
        await asyncio.gather(*(s.open.wait() for s in others))
        t0 = time.monotonic()
        await asyncio.to_thread(burst, store, jid, n, pad=2000)
        await asyncio.to_thread(cancel, api, [jid])
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return time.monotonic() - t0

    try:
        took = run_async(scenario())
        full = log_ids(store, jid)
        for s in others:  # the stalled one never held them back
            assert s.ids == full and s.ended == "terminal"
        assert took < 30
        # The stalled client, reading at last: a prefix, then a clean end of stream
        # (the chunked terminator), before the job's end.
        stalled.settimeout(30)
        raw = b""
        while not raw.endswith(b"0\r\n\r\n"):
            chunk = stalled.recv(1 << 20)
            assert chunk, "the server closed without ending the stream"
            raw += chunk
    finally:
        stalled.close()
    got = [line[4:].decode() for line in raw.split(b"\n") if line.startswith(b"id: ")]
    assert 0 < len(got) < len(full) and got == full[: len(got)]
    assert b"event: job.cancelled" not in raw
    # ... and it resumes from there with Last-Event-ID, losing nothing.
    rest = Stream(jid)
    run_async(rest.read(api, after=got[-1]))
    assert got + rest.ids == full and rest.ended == "terminal"
    store.redis.close()


def test_a_redis_restart_under_500_streams_ends_or_resumes_them_all_cleanly(
    models_file: str, tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path / "redis", appendonly=True).start()
    proc = api_process(
        api_env(redis_server.url, models_file, tmp_path), tmp_path / "api.log"
    ).start()
    assert proc.port is not None
    api = proc.port
    store = JobStore.from_url(redis_server.url)
    try:
        jobs = submit(api, 5)
        streams = [Stream(jobs[i % 5]) for i in range(500)]

        async def scenario() -> None:
            tasks = [asyncio.create_task(s.follow(api)) for s in streams]
            await asyncio.wait_for(asyncio.gather(*(s.open.wait() for s in streams)), 60)
            for jid in jobs:
                await asyncio.to_thread(burst, store, jid, 10)
            await asyncio.to_thread(  # every stream live (the loop runs them meanwhile)
                wait_until,
                lambda: all(len(s.ids) >= 11 for s in streams),
                60,
                interval=0.1,
                message="every stream has its first 11 events",
            )
            await asyncio.to_thread(redis_server.stop)  # SIGTERM: the AOF is kept
            await asyncio.sleep(2)
            await asyncio.to_thread(redis_server.start)
            await asyncio.sleep(1)
            for jid in jobs:
                await asyncio.to_thread(burst, store, jid, 10)
            await asyncio.to_thread(cancel, api, jobs)
            await asyncio.wait_for(asyncio.gather(*tasks), 90)

        run_async(scenario())
        full = {jid: log_ids(store, jid) for jid in jobs}
        assert all(len(ids) == 22 for ids in full.values())
        for s in streams:
            assert s.ids == full[s.job_id] and s.ended == "terminal"
        # Live streams ride it out on their open connection (the reader reconnects).
        assert all(s.cuts == 0 for s in streams)
    finally:
        store.redis.close()
        proc.stop()
        redis_server.stop()
