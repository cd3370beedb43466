"""``ATELIER_DEVICE_CPUS``: the thread that holds the device runs on CPUs of its own.

The worker's slots take turns on the device, so the thread that feeds it is not always
the same one: each pins itself when it takes the device and goes back to the others'
CPUs when it lets it go (``worker/lifecycle.py``). Every other thread of the worker
(Celery's consumer, the monitor, the heartbeat, a slot post-processing its outputs)
inherits the host CPUs from the main thread, which takes them before it starts any.

What it buys: encoding, uploads and Redis never take the core that feeds the device. It
does not change the GIL: another thread's Python still makes the device's thread wait.
It pins threads, not torch's intra-op pool: use it with a CUDA device, or on the CPU
with ``ATELIER_TORCH_THREADS=1``. ``bench/pipeline_efficiency.py`` uses it to make one
CPU core the "device" of both of its sides. Linux only (``os.sched_setaffinity``).
"""

from __future__ import annotations

import logging
import os

from producer.core.settings import Settings

log = logging.getLogger(__name__)


class Pinning:
    """The device's CPUs and the host's (the rest of the worker's CPUs)."""

    def __init__(self, device: frozenset[int], host: frozenset[int]) -> None:
        self.device_cpus, self.host_cpus = device, host

    @classmethod
    def from_settings(cls, settings: Settings) -> Pinning | None:
        """None when ``device_cpus`` is empty; ValueError naming the variable when it
        cannot be applied here."""
        device = settings.device_cpu_set
        if not device:
            return None
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("ATELIER_DEVICE_CPUS needs os.sched_setaffinity (Linux)")
        allowed = frozenset(os.sched_getaffinity(0))
        if not device <= allowed:
            raise ValueError(
                f"ATELIER_DEVICE_CPUS={settings.device_cpus}: CPUs "
                f"{sorted(device - allowed)} are not this worker's "
                f"(it may run on {sorted(allowed)})"
            )
        host = allowed - device
        if not host:
            raise ValueError(
                f"ATELIER_DEVICE_CPUS={settings.device_cpus} leaves no CPU for "
                f"the worker's other threads (it may run on {sorted(allowed)})"
            )
        return cls(device, host)

    def to_device(self) -> None:
        """The calling thread takes the device's CPUs."""
        self._set(self.device_cpus)

    def to_host(self, thread: int | None = None) -> None:
        """The calling thread (or the one whose native id is ``thread``: one started by
        the device's holder inherited its CPUs) goes back to the host's CPUs. The main
        thread does so before it starts any other, so that all of them inherit these."""
        self._set(self.host_cpus, thread or 0)

    @staticmethod
    def _set(cpus: frozenset[int], thread: int = 0) -> None:
        # A placement, never a reason to fail a job (a cpuset changed under the worker).
        try:
            os.sched_setaffinity(thread, cpus)
        except OSError as exc:
            log.warning(
                "ATELIER_DEVICE_CPUS: could not move a thread to CPUs %s: %s", _cpu_text(cpus), exc
            )

    def describe(self) -> str:
        return (
            f"device thread on CPUs {_cpu_text(self.device_cpus)}, "
            f"the rest on {_cpu_text(self.host_cpus)}"
        )


def _cpu_text(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))
