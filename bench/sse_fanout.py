"""Many watchers: the lag of live events through one API replica's event streams.

redis-server, one API replica (real uvicorn, ``atelier api``) and, per round, one worker
on the simulated GPU (``--gpu-ms`` per image over ``--steps`` steps, progress at the
default interval). For each N in ``--streams``: ``--jobs`` jobs are submitted (they
wait: no worker yet), N streams are opened over them, round robin, from ``--clients``
separate client processes (raw asyncio sockets, so the client is not the bottleneck);
when every stream is open the worker starts and the jobs run one after another, each
stream reading until its job's terminal event.

- ``lag_ms_p50`` / ``lag_ms_p99``: over live events only (written after their stream
  was open), from the event id's time (Redis' clock, ms) to its arrival at the client;
- ``redis_clients``: the most connections the API process held to Redis during the
  round (its sockets to Redis' port, sampled every 0.2 s, checked against CLIENT LIST);
- ``api_rss_mb``: the API process's largest resident set in the round;
- ``cut_off``: streams that ended before their terminal event (they would resume).

File descriptors: each stream is a socket in the API and in a client (and, before the
shared reader, one more Redis connection in the API and in Redis), so the bench raises
RLIMIT_NOFILE to its hard limit for itself and the processes it starts. uvicorn's
defaults suffice: ``backlog`` 2048 (clients open at most ``--clients`` x 50 at once) and
no ``limit_concurrency``; a deployment with more simultaneous connects raises backlog
(and ``net.core.somaxconn``).

    python bench/sse_fanout.py [--streams 100,1000,5000] [--jobs 8] [--clients 4]
                               [--gpu-ms 2000] [--steps 10]

Last stdout line: {"bench": "sse_fanout", "rows": [{streams, lag_ms_p50, lag_ms_p99,
redis_clients, api_rss_mb, ...}], ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import redis

from bench.common import Bench, emit, load_average, log, percentile, simulated_model
from tests.servers import Process, api_process

MODEL = "sim-fanout"
KEY = "bench-sse-key-0123456789"
TERMINAL = ("job.succeeded", "job.failed", "job.cancelled", "job.expired")
FRAME = re.compile(rb"id: (\d+)-\d+\nevent: ([\w.]+)\n")
#: Streams one client process opens at once.
OPENING = 50


# -- a client process -------------------------------------------------------------------


async def one_stream(
    port: int, job_id: str, out: dict[str, Any], opened: asyncio.Event, gate: asyncio.Semaphore
) -> None:
    async with gate:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            writer.write(
                f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: bench\r\n"
                f"Authorization: Bearer {KEY}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            status = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
        except OSError:
            out["failed"] += 1
            return
        finally:
            out["pending"] -= 1
            if out["pending"] == 0:
                opened.set()
    if b" 200 " not in status:
        out["failed"] += 1
        writer.close()
        return
    connected_ms = time.time() * 1000
    await opened.wait()
    out[await read_frames(reader, connected_ms, out)] += 1
    writer.close()


async def read_frames(
    reader: asyncio.StreamReader, connected_ms: float, out: dict[str, Any]
) -> str:
    """Read a stream to its end, timing every frame: whole reads scanned with one regex
    (a frame split across reads waits in ``rest``), so that the client costs little."""
    rest = b""
    while True:
        data = await reader.read(1 << 16)
        if not data:
            return "cut_off"
        now = time.time() * 1000
        data = rest + data
        cut = data.rfind(b"\n\n") + 2
        rest = data[cut:] if cut >= 2 else data
        for m in FRAME.finditer(data, 0, cut if cut >= 2 else 0):
            out["events"] += 1
            ms, kind = int(m.group(1)), m.group(2).decode()
            if ms >= connected_ms:
                lag = round(now - ms, 1)
                out["lags"].append(lag)
                out["by_type"].setdefault(kind, []).append(lag)
            if kind in TERMINAL:
                return "ended"
        if rest.endswith(b"0\r\n\r\n"):
            return "cut_off"


async def client_main(port: int, jobs: list[str], n: int) -> None:
    out: dict[str, Any] = {
        "lags": [],
        "by_type": {},
        "events": 0,
        "failed": 0,
        "ended": 0,
        "cut_off": 0,
        "pending": n,
    }
    opened = asyncio.Event()
    gate = asyncio.Semaphore(OPENING)
    tasks = [
        asyncio.create_task(one_stream(port, jobs[i % len(jobs)], out, opened, gate))
        for i in range(n)
    ]
    await opened.wait()
    print("open", flush=True)
    await asyncio.gather(*tasks)
    del out["pending"]
    print(json.dumps(out), flush=True)


# -- the parent -------------------------------------------------------------------------


def redis_sockets(pid: int, redis_port: int) -> set[int]:
    """The local ports of ``pid``'s TCP connections to ``redis_port`` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for row in f:
                cols = row.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                if (
                    state == "01"
                    and inode in inodes
                    and int(remote.rsplit(":", 1)[1], 16) == redis_port
                ):
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def api_clients(r: redis.Redis, pid: int, redis_port: int) -> int:
    """The API's own entries in CLIENT LIST (matched by their address)."""
    ports = redis_sockets(pid, redis_port)
    listed = {int(c["addr"].rsplit(":", 1)[1]) for c in r.client_list()}
    return len(ports & listed)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    def __init__(self, r: redis.Redis, pid: int, redis_port: int) -> None:
        super().__init__(daemon=True)
        self.r, self.pid, self.port = r, pid, redis_port
        self.clients, self.rss = 0, 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            try:
                self.clients = max(self.clients, api_clients(self.r, self.pid, self.port))
                self.rss = max(self.rss, rss_mb(self.pid))
            except (OSError, redis.RedisError, StopIteration):
                pass


def submit_jobs(api: Process, n: int, args: Any) -> list[str]:
    """The round's ``--jobs`` jobs, through the API; they wait for the round's worker."""
    base = f"http://127.0.0.1:{api.port}"
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as http:
        return [
            http.post(
                "/v1/jobs", json={"prompt": f"fanout {n} {i}", "model": MODEL, "steps": args.steps}
            ).json()["id"]
            for i in range(args.jobs)
        ]


def one_round(bench: Bench, api: Process, r: redis.Redis, n: int, args: Any) -> dict[str, Any]:
    jobs = submit_jobs(api, n, args)
    per = [n // args.clients + (i < n % args.clients) for i in range(args.clients)]
    me = str(Path(__file__).resolve())
    clients = [
        subprocess.Popen(
            [sys.executable, me, "--client", str(api.port), str(k), *jobs],
            stdout=subprocess.PIPE,
            cwd=bench.workdir,
        )
        for k in per
        if k
    ]
    assert api.proc is not None and bench.redis is not None
    sampler = Sampler(r, api.proc.pid, bench.redis.port)
    sampler.start()
    t0 = time.monotonic()
    try:
        for c in clients:
            assert c.stdout is not None
            c.stdout.readline()  # "open"
        open_s = time.monotonic() - t0
        log(f"{n} streams open in {open_s:.1f} s; starting the worker")
        worker = bench.worker([MODEL])
        outs = []
        for c in clients:
            stdout, _ = c.communicate(timeout=args.round_s)
            outs.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait(10)
        sampler.stopped.set()
        sampler.join(5)
    worker.stop()
    bench.procs.remove(worker)
    lags = sorted(lag for o in outs for lag in o["lags"])
    row = {
        "streams": n,
        "lag_ms_p50": round(percentile(lags, 0.5), 1) if lags else None,
        "lag_ms_p99": round(percentile(lags, 0.99), 1) if lags else None,
        "redis_clients": sampler.clients,
        "api_rss_mb": round(sampler.rss, 1),
        "live_events": len(lags),
        "failed": sum(o["failed"] for o in outs),
        "cut_off": sum(o["cut_off"] for o in outs),
        "open_s": round(open_s, 1),
        "lag_ms_p99_by_type": by_type(outs),
    }
    log(json.dumps(row))
    return row


def by_type(outs: list[dict[str, Any]]) -> dict[str, float]:
    types = sorted({t for o in outs for t in o["by_type"]})
    lags = {t: sorted(x for o in outs for x in o["by_type"].get(t, [])) for t in types}
    return {t: round(percentile(v, 0.99), 1) for t, v in lags.items() if v}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="100,1000,5000")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--gpu-ms", type=float, default=2000.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--round-s", type=float, default=90.0, help="longest a round waits for its streams to end"
    )
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started, load_before = time.perf_counter(), load_average()
    rows = []
    with Bench(models_toml=simulated_model(MODEL, args.gpu_ms, 64, args.steps), s3=False) as b:
        env = b.env(api_keys=KEY, rate_limit_per_s=0)
        api = api_process(env, b.workdir / "logs" / "api.log").start()
        b.procs.append(api)
        log(f"API pid {api.pid} on port {api.port}")
        assert b.redis is not None
        r = redis.Redis.from_url(b.redis.url)
        for n in (int(x) for x in args.streams.split(",")):
            rows.append(one_round(b, api, r, n, args))
        r.close()
    emit(
        {"bench": "sse_fanout", "rows": rows, "jobs_per_round": args.jobs, "clients": args.clients},
        started,
        load_before,
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        try:  # the client's own CPU competes with the API's on this machine: keep it low
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(client_main(int(sys.argv[2]), sys.argv[4:], int(sys.argv[3])))
        sys.exit(0)
    sys.exit(main())
