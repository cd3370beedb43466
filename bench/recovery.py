"""How fast a lost worker's jobs come back: leases and the reconciler, under kills.

Three workers serve a simulated GPU (``--gpu-ms`` per image, GIL released), with every
recovery setting at its default: heartbeat 5 s (a lease lives 15 s), reconciler every
5 s, visibility timeout a day. Jobs arrive at a steady rate a little above what the
fleet serves (12 a second against ~10), so a backlog builds and a victim usually holds
two jobs: one running, one taken and waiting for its GPU. At seeded random moments
during the arrivals, the whole process group of a worker holding jobs is SIGKILLed
(what a lost spot node or ``docker kill`` does) and a replacement is started, as an
orchestrator would.

For every job a victim held when it died (running, or taken and waiting for its GPU),
its recovery is the time from the kill to the job's end (record ``finished_at``).
``recovery_s_p50`` and ``recovery_s_max`` are over those jobs; ``lost`` counts jobs
that did not end ``succeeded``; ``duplicate_outcomes`` counts terminal events beyond
one per job (from the global event stream).

    python bench/recovery.py [--jobs 60] [--workers 3] [--kills 3] [--gpu-ms 300]
                             [--rate 12] [--seed 1]

Last stdout line: {"bench": "recovery", "jobs", "kills", "recovery_s_p50",
"recovery_s_max", "lost", "duplicate_outcomes", ...}
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Bench, emit, load_average, log, percentile, simulated_model
from producer import Client
from producer.core import keys as K
from producer.core.contract import TERMINAL_EVENTS, EventType, Record, Status, parse_iso
from producer.jobs.eventlog import decode_event
from tests.servers import Worker

MODEL = "sim-recovery"


def start_worker(bench: Bench, n: int) -> Worker:
    w = Worker(bench.env(), bench.workdir / "logs" / f"worker-{n}.log", [MODEL], new_session=True)
    w.start(wait=False)
    bench.procs.append(w)
    return w


def leased_to(r: Any, worker: Worker) -> list[str]:
    jobs = [j.decode() for j in r.zrange(K.LEASES, 0, -1)]
    holders = [r.hget(K.job_key(j), "lease") for j in jobs]
    return [
        j
        for j, h in zip(jobs, holders, strict=True)
        if h is not None and h.decode().endswith(f":{worker.pid}")
    ]


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    started, load_before = time.perf_counter(), load_average()

    toml = simulated_model(MODEL, args.gpu_ms, 64, steps=10)
    with Bench(models_toml=toml, s3=False) as bench:
        workers = [start_worker(bench, i) for i in range(args.workers)]
        for w in workers:
            w.wait_ready(timeout=180)
        with Client(bench.settings()) as client:
            r: Any = client.store.redis  # bytes replies, as leased_to expects
            killer = Killer(bench, workers, r, rng, kill_moments(rng, args))
            ids = submit_with_kills(client, killer, args)
            records = await_terminal(client, ids)
            terminal = Counter(
                decode_event(eid, f)["job_id"]
                for eid, f in r.xrange(K.GLOBAL_EVENTS)
                if EventType(f[b"type"].decode()) in TERMINAL_EVENTS
            )
    report(args, ids, records, killer, terminal, started, load_before)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--gpu-ms", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=12.0, help="jobs submitted per second")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


def kill_moments(rng: random.Random, args: argparse.Namespace) -> list[float]:
    """Kill moments: seeded, inside the submission span, at least 1.5 s apart."""
    span = args.jobs / args.rate
    moments = sorted(rng.uniform(1.0, max(2.0, span - 1.0)) for _ in range(args.kills))
    for i in range(1, len(moments)):
        moments[i] = max(moments[i], moments[i - 1] + 1.5)
    return moments


class Killer:
    """Kills a worker holding jobs at each moment, and starts its replacement; records
    when each job a victim held was lost."""

    def __init__(
        self, bench: Bench, workers: list[Worker], r: Any, rng: random.Random, moments: list[float]
    ) -> None:
        self.bench, self.workers, self.r, self.rng = bench, workers, r, rng
        self.moments = moments
        self.n_started = len(workers)
        self.held: dict[str, float] = {}
        self.kills = 0

    def due(self, now: float) -> bool:
        return bool(self.moments) and now >= self.moments[0]

    def try_kill(self, now: float) -> bool:
        """Kills one worker (True), or waits for one to hold a job (False)."""
        live = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        holding = [w for w in live if leased_to(self.r, w)]
        if not (holding or now > self.moments[0] + 3.0):  # wait briefly for a busy one
            return False
        self.moments.pop(0)
        victim = self.rng.choice(holding or live)
        jobs = leased_to(self.r, victim)
        victim.kill_group()
        killed_at = time.time()
        self.held.update(dict.fromkeys(jobs, killed_at))
        self.kills += 1
        log(f"killed worker {victim.pid} holding {len(jobs)} job(s)")
        self.workers.remove(victim)
        self.workers.append(start_worker(self.bench, self.n_started))
        self.n_started += 1
        return True


def submit_with_kills(client: Client, killer: Killer, args: argparse.Namespace) -> list[str]:
    """Jobs at ``--rate`` a second, workers killed at the killer's moments meanwhile."""
    ids: list[str] = []
    t0 = time.monotonic()
    while len(ids) < args.jobs or killer.moments:
        now = time.monotonic() - t0
        if len(ids) < args.jobs and now >= len(ids) / args.rate:
            ids.append(client.submit(prompt=f"recovery {len(ids)}", model=MODEL, seed=len(ids)))
            continue
        if killer.due(now) and killer.try_kill(now):
            continue
        time.sleep(0.01)
    return ids


def await_terminal(client: Client, ids: list[str]) -> dict[str, Record]:
    """The records of the jobs that ended within 150 s."""
    deadline = time.monotonic() + 150
    records: dict[str, Record] = {}
    while len(records) < len(ids) and time.monotonic() < deadline:
        for job_id in ids:
            if job_id not in records:
                doc = client.get(job_id)
                if Status(doc["status"]).is_terminal():
                    records[job_id] = doc
        time.sleep(0.2)
    return records


def report(
    args: argparse.Namespace,
    ids: list[str],
    records: dict[str, Record],
    killer: Killer,
    terminal: Counter[str],
    started: float,
    load_before: float,
) -> None:
    held = killer.held
    lost = sum(
        1 for j in ids if (records[j]["status"] if j in records else None) != Status.SUCCEEDED
    )
    recoveries = [
        parse_iso(str(records[j]["finished_at"])).timestamp() - t
        for j, t in held.items()
        if j in records
    ]
    attempts = Counter(r["attempts"] for r in records.values())
    emit(
        {
            "bench": "recovery",
            "jobs": len(ids),
            "kills": killer.kills,
            "recovery_s_p50": round(percentile(recoveries, 0.5), 2) if recoveries else None,
            "recovery_s_max": round(max(recoveries), 2) if recoveries else None,
            "lost": lost,
            "duplicate_outcomes": sum(max(0, terminal[j] - 1) for j in ids),
            "jobs_held_by_victims": len(held),
            "attempts": {str(k): v for k, v in sorted(attempts.items())},
            "gpu_ms": args.gpu_ms,
            "workers": args.workers,
            "seed": args.seed,
        },
        started,
        load_before,
    )


if __name__ == "__main__":
    sys.exit(main())
