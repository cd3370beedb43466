"""The worker's heartbeat: its state in Redis (``/v1/workers``, ``atelier workers``) every
``worker_heartbeat_s``, and the renewal of the leases of the jobs it holds."""

from __future__ import annotations

import threading
from typing import Any

import redis

from producer.core.contract import now_iso
from producer.core.loops import run_every
from producer.jobs import fleet
from producer.jobs.store import JobStore
from worker.lifecycle import Lifecycle


class Heartbeat(threading.Thread):
    """Writes this worker's state to Redis every ``worker_heartbeat_s``; the key expires
    after three periods, so a dead worker disappears from ``/v1/workers`` by itself.
    Each beat also renews the leases of the jobs the worker holds (``3 ×`` the period):
    a job's lease lives exactly as long as its worker's heartbeat, however long it runs."""

    def __init__(
        self, store: JobStore, lifecycle: Lifecycle, info: dict[str, Any], period_s: float
    ) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.store, self.lifecycle, self.info, self.period_s = store, lifecycle, info, period_s
        self.stopped = threading.Event()

    def beat(self) -> None:
        current, done = self.lifecycle.activity()
        state = {
            **self.info,
            "state": "busy" if current else "idle",
            "current_jobs": current,
            "jobs_done": done,
            "memory": memory(self.info["device"]),
            "last_seen": now_iso(),
        }
        fleet.beat(self.store.redis, self.info["id"], state, ttl_s=3 * self.period_s)
        # The leases of the jobs this worker holds live as long as its heartbeat does.
        self.store.renew(self.info["id"], current, self.lifecycle.settings.lease_ttl_s)

    def run(self) -> None:
        # Never let the thread die: the leases of every job held here live on it.
        run_every(self.stopped, lambda: self.period_s, self.beat, "heartbeat")

    def stop(self) -> None:
        self.stopped.set()
        try:
            fleet.retire(self.store.redis, self.info["id"])
        except redis.RedisError:
            pass


def memory(device: str) -> dict[str, int]:
    """The process's peak resident memory and, on CUDA, the device's allocated, used and
    total bytes: what each beat reports and the worker's memory gauges read."""
    import resource

    out = {"rss_max_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        out.update(
            gpu_allocated_bytes=int(torch.cuda.memory_allocated(torch.device(device))),
            gpu_used_bytes=int(total - free),
            gpu_total_bytes=int(total),
        )
    return out
