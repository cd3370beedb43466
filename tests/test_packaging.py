"""Boundaries the design fixes: a light producer, a reproducible tiny model."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from tests.servers import ROOT


def test_producer_never_imports_torch() -> None:
    code = (
        "import sys, producer, producer.client, producer.cli, producer.store, "
        "producer.storage, producer.netguard, producer.broker, producer.api, "
        "producer.dispatcher, producer.webhooks, producer.fleet\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'worker', 'numpy')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, f"producer imported {res.stdout.strip()} {res.stderr[-2000:]}"


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_sdxl_builds_to_the_same_bytes(tmp_path: Path, models_dir: Path) -> None:
    """Built twice (here in a fresh process): identical files, all weights safetensors."""
    code = "import sys; from worker.tiny import build_tiny_sdxl; build_tiny_sdxl(sys.argv[1])"
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    first, second = _hashes(models_dir / "tiny-sdxl"), _hashes(tmp_path / "again")
    assert first == second
    weights = [name for name in first if "model" in name and not name.endswith(".json")]
    assert weights and all(name.endswith(".safetensors") for name in weights)
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".ckpt")) for name in first)
