"""``ATELIER_DEVICE_CPUS``: the slot that holds the device runs on its own CPUs, every
other thread of the worker on the rest (``worker/affinity.py``).

Read from ``/proc``: a real worker subprocess on a simulated GPU, watched while a job
holds the device and after it ends; the lifecycle's device handle in this process; the
setting refused, by its name, where it cannot apply.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from producer import Client
from producer.core.settings import Settings
from tests.helpers import stack_values, wait_until, worker_env
from tests.servers import RedisServer, Worker
from worker.affinity import Pinning
from worker.lifecycle import DeviceLock, _Device
from worker.metrics import BusyClock

ROOT = Path(__file__).resolve().parent.parent
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to split")
DEVICE, HOST = frozenset(CPUS[-1:]), frozenset(CPUS[:-1])

SIMULATED = """[models."sim-pinned"]
pipeline = "simulated"
source = "builtin:simulated"
gpu_ms = 1500
steps = 4
width = 64
height = 64
"""


def threads_cpus(pid: int) -> dict[int, frozenset[int]]:
    """Each thread of ``pid`` and the CPUs it may run on."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:
            pass  # ended meanwhile
    return out


@needs_two
def test_the_device_holder_runs_on_the_device_cpus_and_goes_back() -> None:
    pinning = Pinning(DEVICE, HOST)
    seen: dict[str, frozenset[int]] = {}

    def slot() -> None:
        seen["before"] = frozenset(os.sched_getaffinity(0))
        device = _Device(DeviceLock(), BusyClock(), pinning)
        seen["holding"] = frozenset(os.sched_getaffinity(0))
        device.release()
        seen["after"] = frozenset(os.sched_getaffinity(0))

    t = threading.Thread(target=slot)
    t.start()
    t.join(10)
    assert seen["before"] == frozenset(CPUS)
    assert seen["holding"] == DEVICE
    assert seen["after"] == HOST
    assert frozenset(os.sched_getaffinity(0)) == frozenset(CPUS)  # this thread untouched


@pytest.mark.slow
@needs_two
def test_a_worker_pins_the_device_holder_and_nothing_else(
    session_dir: Path, redis_server: RedisServer, models_dir: Path
) -> None:
    models_file = session_dir / "pinned-models.toml"
    models_file.write_text(SIMULATED)
    device = ",".join(str(c) for c in sorted(DEVICE))
    values = stack_values(
        redis_server.url,
        models_dir,
        str(models_file),
        f"file://{session_dir / 'pinned-outputs'}",
        default_model="sim-pinned",
        device_cpus=device,
    )
    worker = Worker(worker_env(values), session_dir / "logs" / "pinned.log", ["sim-pinned"])
    worker.start()
    try:
        assert f"device thread on CPUs {device}, the rest on" in worker.log()
        with Client(Settings(**values)) as client:
            job_id = client.submit(prompt="pinned", seed=1)
            wait_until(
                lambda: (client.get(job_id)["progress"] or {}).get("step", 0) >= 1,
                30,
                message="the job's first step",
            )
            during = threads_cpus(worker.pid)
            record = client.wait(job_id, timeout=60)
        assert record["status"] == "succeeded"
        # While the job holds the device: its slot alone on the device's CPUs.
        assert sorted(during.values()).count(DEVICE) == 1, during
        assert all(cpus in (DEVICE, HOST) for cpus in during.values()), during
        assert during[worker.pid] == HOST  # the main thread (Celery's consumer)
        # Let go with the device: every thread on the host's CPUs again.
        wait_until(
            lambda: set(threads_cpus(worker.pid).values()) == {HOST},
            10,
            message=lambda: f"all threads back on {sorted(HOST)}: {threads_cpus(worker.pid)}",
        )
    finally:
        worker.stop()


@needs_two
def test_pinning_refuses_what_it_cannot_apply() -> None:
    assert Pinning.from_settings(Settings(device_cpus="")) is None
    beyond = max(CPUS) + 1
    with pytest.raises(ValueError, match=rf"ATELIER_DEVICE_CPUS={beyond}: CPUs \[{beyond}\]"):
        Pinning.from_settings(Settings(device_cpus=str(beyond)))
    everything = ",".join(str(c) for c in CPUS)
    with pytest.raises(ValueError, match="leaves no CPU for the worker's other threads"):
        Pinning.from_settings(Settings(device_cpus=everything))


@pytest.mark.parametrize("value", ["a", "3-1", "1,", "0-99999"])
def test_a_bad_cpu_list_names_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match="ATELIER_DEVICE_CPUS must be a CPU list"):
        Settings(device_cpus=value)


@pytest.mark.slow
def test_a_worker_with_an_unusable_cpu_list_exits_saying_why(tmp_path: Path) -> None:
    beyond = max(CPUS or [0]) + 1
    env = {**os.environ, "ATELIER_DEVICE_CPUS": str(beyond), "ATELIER_MODELS_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "worker", "--model", "tiny-sdxl"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"ATELIER_DEVICE_CPUS={beyond}" in out.stderr
    assert "loaded" not in out.stderr  # refused before any model is loaded
