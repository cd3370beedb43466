"""The wheel, as the Dockerfiles build it (`pip install .` of pyproject.toml, README.md,
producer/ and worker/): every module and data file of the tree is in it, and an install
of it (not editable, outside the tree) runs the demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.servers import ROOT

PACKAGES = ("producer", "worker")
#: What a build or a run leaves in the tree that is no part of the distribution.
CACHES = ("__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache")
PIP = (sys.executable, "-m", "pip")


def tree_files() -> set[str]:
    """Every file of the packages in the tree (modules and data), caches left out."""
    out = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            rel = path.relative_to(ROOT)
            if path.is_file() and not set(rel.parts) & set(CACHES) and path.suffix != ".pyc":
                out.add(rel.as_posix())
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of what the Dockerfiles copy: a build in the tree
    itself would reuse build/lib, where a module deleted since an earlier build lingers."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns(*CACHES))
    dist = base / "dist"
    res = subprocess.run(
        [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(dist)],
        capture_output=True,
        text=True,
        cwd=base,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (built,) = dist.glob("atelier-*.whl")
    return built


def test_the_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.split("/", 1)[0] in PACKAGES}
    tree = tree_files()
    # the files read at run time (the registry, the studio page) are among them
    assert {
        "producer/core/models.toml",
        "producer/api/static/index.html",
        "producer/api/static/studio.css",
        "producer/api/static/js/main.js",
    } <= tree
    assert tree - shipped == set(), "in the tree, missing from the wheel"
    assert shipped - tree == set(), "in the wheel, not in the tree"
    # and nothing else but the distribution's metadata
    assert all(n.startswith("atelier-0.1.0.dist-info/") for n in names - shipped)


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo(wheel: Path, tmp_path: Path, models_dir: Path) -> None:
    """The image's path: the wheel installed (not editable) into a folder of its own, run
    from a folder outside the tree, with nothing of the tree on sys.path."""
    site = tmp_path / "site"
    res = subprocess.run(
        [*PIP, "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "ATELIER_MODELS_DIR": str(models_dir),
        "ATELIER_DEVICE": "cpu",
        "ATELIER_TORCH_THREADS": "1",
    }
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import producer, worker as w; print(producer.__file__, w.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=run_dir,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    files = [Path(p) for p in where.stdout.split()]
    assert len(files) == 2 and all(p.is_relative_to(site) for p in files), files
    out = tmp_path / "out"
    demo = subprocess.run(
        [sys.executable, "-m", "producer.cli", "demo", "x", "--out", str(out), "--seed", "3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=run_dir,
        timeout=240,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    path = Path(demo.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.suffix == ".png"
    assert Image.open(path).format == "PNG"
