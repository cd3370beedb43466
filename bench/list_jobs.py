"""What a page of the job list costs at 100 and at 100,000 jobs (docs/api.md, "Listing jobs").

One private redis-server. Owner ``small`` gets 100 jobs and its page latencies are
measured (row 1); then owner ``big`` gets ``--jobs`` (100,000) more, and both owners
are measured again, their calls alternating so that both see the same machine load
(rows 2, ``big``, and 3, ``small``: the ratios compare these two).

Each job is written as the API and a worker write it: ``JobStore.create`` (a queued
record and its ``job.queued`` event) then one terminal transition (``JobStore.apply``:
the record with one output, its terminal event), both through the store's own
transition script with its own keys and arguments, which maintains the index; only the
calls are pipelined (1,000 at a time) instead of sent one by one. Mix: 80 % succeeded,
10 % failed, 10 % still queued; two models.

Measured, each ``--reads`` times, p50 / p99 in ms:

- ``store``: ``JobList.page(owner, limit=20)``, the first page (one Lua call);
- ``store_deep``: a page from a cursor half way down the owner's jobs;
- ``store_filtered``: ``status=succeeded, model=m-two`` (40 % of the jobs);
- ``api``: ``GET /v1/jobs?limit=20`` through a real ``atelier api`` (uvicorn) with
  httpx, keep-alive: auth, rate-limit script, the page, the views (queue places and
  webhook deliveries in one pipelined round trip), JSON;
- ``api_filtered``: ``GET /v1/jobs?limit=20&status=succeeded&model=m-two``.

    python bench/list_jobs.py [--jobs 100000] [--reads 300]

Last stdout line: {"bench": "list_jobs", "rows": [{"owner", "owner_jobs",
"store_p50_ms", "store_p99_ms", ..., "api_p50_ms", "api_p99_ms", ...}, ...],
"api_p50_ratio" (at 100k ÷ at 100), "store_p50_ratio", "fill_s", "fill_jobs_per_s",
"index_bytes_per_job", ...}
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, emit, load_average, log, percentile
from producer.api.keys import key_id
from producer.core import keys as K
from producer.core.contract import Status, new_record, now_iso, terminal_event
from producer.core.normalized import GenerateRequest
from producer.core.record import Output
from producer.jobs.intake import new_job_id
from producer.jobs.joblist import JobList
from producer.jobs.store import JobStore
from tests.records import changed
from tests.servers import api_process

KEYS = {"small": "bench-list-key-small-0123456789", "big": "bench-list-key-big-0123456789"}
BATCH = 1000


def owner_of(name: str) -> str:
    return key_id(hashlib.sha256(KEYS[name].encode()).hexdigest())


class Pipelined:
    """Stands in for the store's registered transition script: the very keys and
    arguments ``JobStore.apply`` builds, queued on a pipeline (replies checked when it
    is sent) instead of sent one call at a time."""

    def __init__(self, script: Any, pipe: Any) -> None:
        self.script, self.pipe = script, pipe

    def __call__(self, keys: list[str], args: list[Any]) -> tuple[int, str]:
        self.script(keys=keys, args=args, client=self.pipe)
        return 1, "pipelined"


def fill(url: str, owner: str, count: int) -> float:
    """``count`` jobs of ``owner``; returns the seconds it took."""
    import redis

    r = redis.Redis.from_url(url)
    store = JobStore(r)
    pipe = r.pipeline(transaction=False)
    store._apply = Pipelined(store._apply, pipe)  # type: ignore[assignment]
    t0 = time.perf_counter()
    for start in range(0, count, BATCH):
        for i in range(start, min(count, start + BATCH)):
            fill_one(store, owner, i)
        replies = pipe.execute()
        refused = [x for x in replies if not int(x[0])]
        if refused:
            raise SystemExit(f"fill: {len(refused)} transitions refused: {refused[:3]}")
        if start and start % 20000 == 0:
            log(f"  {start} jobs")
    elapsed = time.perf_counter() - t0
    r.close()
    return elapsed


def fill_one(store: JobStore, owner: str, i: int) -> None:
    """Job number ``i`` of ``owner``: created, then (8 in 10) succeeded, (1 in 10)
    failed or (1 in 10) left queued."""
    record = new_record(new_job_id(), job_request(i), now_iso(), owner)
    store.create(record)
    status = (Status.SUCCEEDED, Status.FAILED, Status.QUEUED)[
        0 if i % 10 < 8 else 1 if i % 10 == 8 else 2
    ]
    if status is Status.QUEUED:
        return
    ended = changed(
        record,
        status=status.value,
        started_at=now_iso(),
        finished_at=now_iso(),
        attempts=1,
        worker="bench",
    )
    if status is Status.SUCCEEDED:
        ended["outputs"] = [succeeded_output(record["id"], i)]
        ended["timings"] = {
            "queued_ms": 3,
            "inference_ms": 900,
            "encode_ms": 8,
            "upload_ms": 2,
            "total_ms": 913,
        }
    else:
        ended["error"] = {"code": "internal", "message": "bench"}
    store.apply(record["id"], allowed="queued", record=ended, events=[terminal_event(ended)])


def job_request(i: int) -> GenerateRequest:
    """The normalized request of job number ``i`` (models alternating)."""
    return {
        "prompt": f"a lighthouse at dusk, number {i}",
        "negative_prompt": "",
        "model": "m-one" if i % 2 else "m-two",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 5.0,
        "scheduler": "euler",
        "seed": i,
        "num_images": 1,
        "image": None,
        "strength": None,
        "output_format": "png",
        "quality": 90,
        "webhook": None,
        "webhook_events": ["completed"],
        "metadata": {},
        "priority": 5,
        "timeout_s": 600,
        "expires_in_s": None,
    }


def succeeded_output(job_id: str, i: int) -> Output:
    """The one output a succeeded job ``i`` records."""
    return {
        "index": 0,
        "key": f"{job_id}/0.png",
        "url": f"file:///srv/atelier/{job_id}/0.png",
        "seed": i,
        "width": 64,
        "height": 64,
        "content_type": "image/png",
        "bytes": 9000,
        "sha256": hashlib.sha256(job_id.encode()).hexdigest(),
    }


def calls(jobs: JobList, api: Any, name: str) -> dict[str, Callable[[], Any]]:
    """What is timed for one owner, by label; each checked once first."""
    owner = owner_of(name)
    headers = {"Authorization": f"Bearer {KEYS[name]}"}
    key = K.list_key(owner)
    size = int(jobs.store.redis.zcard(key))
    middle: Any = jobs.store.redis.zrange(key, size // 2, size // 2)
    cursor = middle[0].decode()

    def page(**query: Any) -> None:
        got = jobs.page(owner, limit=20, **query)
        assert len(got["data"]) == 20, "a short page"

    def api_get(**params: Any) -> None:
        res = api.get("/v1/jobs", params={"limit": 20, **params}, headers=headers)
        assert res.status_code == 200 and len(res.json()["data"]) == 20, res.text[:300]

    out: dict[str, Callable[[], Any]] = {
        "store": lambda: page(),
        "store_deep": lambda: page(cursor=cursor),
        "store_filtered": lambda: page(status="succeeded", model="m-two"),
        "api": lambda: api_get(),
        "api_filtered": lambda: api_get(status="succeeded", model="m-two"),
    }
    for call in out.values():
        call()  # checked, and warm (scripts loaded, connections open)
    return out


def measure(jobs: JobList, api: Any, names: list[str], reads: int) -> list[dict[str, Any]]:
    """One row per owner; the owners' calls alternate, so that each sees the same load."""
    plans = [calls(jobs, api, name) for name in names]
    samples: list[dict[str, list[float]]] = [{label: [] for label in p} for p in plans]
    for label in plans[0]:
        for _ in range(reads):
            for plan, got in zip(plans, samples, strict=True):
                t0 = time.perf_counter()
                plan[label]()
                got[label].append((time.perf_counter() - t0) * 1000)
    rows = []
    for name, got in zip(names, samples, strict=True):
        owner_jobs = int(jobs.store.redis.zcard(K.list_key(owner_of(name))))
        row: dict[str, Any] = {"owner": name, "owner_jobs": owner_jobs}
        for label, values in got.items():
            row[f"{label}_p50_ms"] = round(percentile(values, 0.5), 3)
            row[f"{label}_p99_ms"] = round(percentile(values, 0.99), 3)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--reads", type=int, default=300)
    args = parser.parse_args()
    import httpx

    started, load_before = time.perf_counter(), load_average()
    with Bench(s3=False) as bench:
        assert bench.redis is not None
        url = bench.redis.url
        api_proc = api_process(
            bench.env(api_keys=",".join(KEYS.values()), rate_limit_per_s=0),
            bench.workdir / "logs" / "api.log",
        )
        bench.procs.append(api_proc)
        api_proc.start()
        store = JobStore.from_url(url)
        jobs = JobList(store)
        with httpx.Client(base_url=f"http://127.0.0.1:{api_proc.port}", timeout=30) as api:
            fill(url, owner_of("small"), 100)
            log("100 jobs: measuring")
            alone = measure(jobs, api, ["small"], args.reads)[0]
            log(f"filling {args.jobs} jobs of another owner")
            fill_s = fill(url, owner_of("big"), args.jobs)
            log(f"filled in {fill_s:.1f} s: measuring both owners, alternating")
            small, big = measure(jobs, api, ["small", "big"], args.reads)
        index_bytes = sum(
            int(store.redis.memory_usage(k) or 0)
            for k in store.redis.scan_iter(f"{K.JOB_LIST}{owner_of('big')}:*", count=1000)
        )
        store.redis.close()
    emit(
        {
            "bench": "list_jobs",
            "jobs": args.jobs,
            "reads": args.reads,
            "limit": 20,
            "rows": [alone, big, small],
            "api_p50_ratio": round(big["api_p50_ms"] / small["api_p50_ms"], 3),
            "store_p50_ratio": round(big["store_p50_ms"] / small["store_p50_ms"], 3),
            "fill_s": round(fill_s, 2),
            "fill_jobs_per_s": round(args.jobs / fill_s),
            "fill": "JobStore.create + one terminal JobStore.apply per job (80 % of them; "
            "10 % failed, 10 % left queued), the store's own script, pipelined",
            "index_bytes_per_job": round(index_bytes / args.jobs),
        },
        started,
        load_before,
    )


if __name__ == "__main__":
    main()
