"""The README's first command, as a user runs it: `atelier demo PROMPT`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import png_text, wait_until
from tests.servers import ROOT

pytestmark = pytest.mark.slow


def test_demo_writes_an_image_and_stops_everything(tmp_path: Path, models_dir: Path) -> None:
    env = {
        **os.environ,
        "ATELIER_MODELS_DIR": str(models_dir),
        "ATELIER_DEVICE": "cpu",
        "ATELIER_TORCH_THREADS": "1",
    }
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "demo",
            "a lighthouse at dusk",
            "--out",
            str(out),
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.exists()
    assert Image.open(path).size == (64, 64)
    assert "lighthouse" in png_text(Image.open(path))["parameters"]
    # nothing it started is left running: its redis-server ran in an atelier-demo-* dir
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "atelier-demo-" not in ps


def test_demo_cleans_up_when_terminated(tmp_path: Path, models_dir: Path) -> None:
    """SIGTERM mid-start (as a closing terminal or a CI timeout sends it): every
    process the demo started stops, and its temporary folder goes."""
    import signal
    import time

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {
        **os.environ,
        "ATELIER_MODELS_DIR": str(models_dir),
        "ATELIER_DEVICE": "cpu",
        "TMPDIR": str(tmpdir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "demo", "x"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def worker_log() -> list[Path]:
        found = list(tmpdir.glob("atelier-demo-*/worker.log"))
        assert found or proc.poll() is None, f"the demo exited with {proc.returncode}"
        return found

    try:
        wait_until(worker_log, 30, interval=0.1, message="the demo starts its worker")
        time.sleep(1.0)  # the worker is importing torch now
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def lingering() -> list[str]:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        return [line for line in ps.splitlines() if str(tmpdir) in line]

    # redis-server ran with --dir in there; the worker logs there
    wait_until(
        lambda: not lingering(),
        10,
        interval=0.2,
        message=lambda: f"no process of the demo left: {lingering()}",
    )
    assert list(tmpdir.iterdir()) == []
