"""Boundaries the design fixes: a light producer, a reproducible tiny model."""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from pathlib import Path

from tests.servers import ROOT


def test_producer_never_imports_torch() -> None:
    code = (
        "import sys, producer, producer.client, producer.cli.main, producer.jobs.store, "
        "producer.core.storage, producer.core.netguard, producer.jobs.broker, producer.api, "
        "producer.services.dispatcher, producer.services.webhooks, producer.jobs.fleet\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'worker', 'numpy')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, f"producer imported {res.stdout.strip()} {res.stderr[-2000:]}"


def test_settings_are_read_in_one_place() -> None:
    """No module but producer/core/settings.py reads the environment: settings are read in
    one place."""
    readers = []
    for path in sorted([*(ROOT / "producer").rglob("*.py"), *(ROOT / "worker").rglob("*.py")]):
        if path == ROOT / "producer" / "core" / "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("environ", "getenv")
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            ):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers == []


def test_the_public_api_is_pinned() -> None:
    """What ``import producer`` offers, as httpx pins its own: a change here is a change
    of the public API, made on purpose."""
    import producer

    assert producer.__all__ == [
        "AtelierError",
        "Client",
        "Event",
        "EventType",
        "InvalidRequest",
        "JobError",
        "JobNotFound",
        "Output",
        "Record",
        "Settings",
        "Status",
        "Unavailable",
        "UnknownModel",
        "get_settings",
        "validate_request",
    ]
    assert all(getattr(producer, name) is not None for name in producer.__all__)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_tiny_sdxl_builds_to_the_same_bytes(tmp_path: Path, models_dir: Path) -> None:
    """Built twice (here in a fresh process): identical files, all weights safetensors."""
    code = (
        "import sys; from worker.builtin.tiny import build_tiny_sdxl; build_tiny_sdxl(sys.argv[1])"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "again")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    first, second = _hashes(models_dir / "tiny-sdxl"), _hashes(tmp_path / "again")
    assert first == second
    weights = [name for name in first if "model" in name and not name.endswith(".json")]
    assert weights and all(name.endswith(".safetensors") for name in weights)
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".ckpt")) for name in first)


def test_the_studio_page_ships_in_the_wheel(tmp_path: Path) -> None:
    """A non-editable install serves ``GET /`` too: every file of the page is package
    data of the wheel."""
    import zipfile

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            ".",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("atelier-*.whl")
    static = ROOT / "producer" / "api" / "static"
    page = {p.relative_to(ROOT).as_posix() for p in static.rglob("*") if p.is_file()}
    assert {"producer/api/static/index.html", "producer/api/static/js/main.js"} <= page
    assert page <= set(zipfile.ZipFile(wheel).namelist())
