"""The README's first command, as a user runs it: `atelier demo PROMPT`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.servers import ROOT

pytestmark = pytest.mark.slow


def test_demo_writes_an_image_and_stops_everything(tmp_path: Path, models_dir: Path) -> None:
    env = {**os.environ, "ATELIER_MODELS_DIR": str(models_dir), "ATELIER_DEVICE": "cpu",
           "ATELIER_TORCH_THREADS": "1"}
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "producer.cli", "demo", "a lighthouse at dusk", "--out", str(out),
         "--seed", "3"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.exists()
    assert Image.open(path).size == (64, 64)
    assert "lighthouse" in Image.open(path).text["parameters"]
    # nothing it started is left running: its redis-server ran in an atelier-demo-* dir
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "atelier-demo-" not in ps
