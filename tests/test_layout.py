"""The layout's rules that import-linter (``.importlinter``, ``make lint``) cannot hold, read
from the source: no module over 450 lines and no function over 60 (in producer/, worker/,
tests/ and bench/); no module of producer/ or worker/ importing another module's private
names; and the layout the docs draw (the README's and docs/architecture.md's trees) is the
tree's, module for module."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("producer", "worker")
#: Where the size limits hold: the code, and its tests and benchmarks too.
SIZED = (*PACKAGES, "tests", "bench")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60

#: The tiny builders are mostly one config dict each: long, and clearer whole.
LONG_FUNCTIONS_ALLOWED = {
    ("worker/builtin/tiny.py", "build_tiny_sdxl"),
    ("worker/builtin/tiny.py", "build_tiny_flux"),
}


def _modules(folders: tuple[str, ...] = PACKAGES) -> Iterator[tuple[str, str, ast.Module]]:
    for package in folders:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "node_modules" in path.parts:
                continue
            source = path.read_text()
            yield path.relative_to(ROOT).as_posix(), source, ast.parse(source)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``from producer.x import _y``, and ``m._y`` where ``m`` is a name imported from
    producer or worker (a module or a class of theirs)."""
    ours: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                if _private(alias.name):
                    yield node.lineno, alias.name
                ours.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in PACKAGES:
                    ours.add(alias.asname or parts[0])
                    yield from ((node.lineno, p) for p in parts if _private(p))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in ours
        ):
            yield node.lineno, f"{node.value.id}.{node.attr}"


def test_no_module_is_over_450_lines() -> None:
    over = [
        f"{path}: {len(source.splitlines())} lines"
        for path, source, _ in _modules(SIZED)
        if len(source.splitlines()) > MAX_MODULE_LINES
    ]
    assert over == []


def test_no_function_is_over_60_lines() -> None:
    over = []
    for path, _, tree in _modules(SIZED):
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and (path, node.name) not in LONG_FUNCTIONS_ALLOWED:
                over.append(f"{path}:{node.lineno} {node.name}: {lines} lines")
    assert over == []


def test_no_module_imports_another_modules_private_names() -> None:
    # A name shared between modules is part of the sender's interface: public, or moved.
    found = [
        f"{path}:{line} {name}"
        for path, _, tree in _modules()
        for line, name in _private_uses(tree)
    ]
    assert found == []


def test_the_check_sees_private_imports() -> None:
    tree = ast.parse(
        "from producer.core import keys\n"
        "from producer.requests.generate import _loc\n"
        "from worker.builtin.tiny import build_tiny_sdxl as b\n"
        "import json\n"
        "x = keys._NOT_PUBLIC + b._hidden + json._private + keys.__name__\n"
    )
    assert sorted(name for _, name in _private_uses(tree)) == [
        "_loc",
        "b._hidden",
        "keys._NOT_PUBLIC",
    ]


def _drawn_modules(markdown: str, heading: str) -> set[str]:
    """The .py files of the first code block after ``heading``: a tree, two spaces a
    level, a name ending in ``/`` or ``.py`` first on each line (a package's line stands
    for its ``__init__.py``)."""
    section = markdown[markdown.index(heading) :]
    block = section.split("```\n", 2)[1]
    stack: list[str] = []
    found = set()
    for line in block.splitlines():
        match = re.match(r"^( *)([\w.]+(?:/[\w.]+)*(?:/|\.py))(?:\s|$)", line)
        if match is None:
            continue
        depth = len(match[1]) // 2
        if depth > len(stack):  # a description's continuation, not a name
            continue
        name = match[2]
        if name.endswith("/"):
            stack = [*stack[:depth], name.rstrip("/")]
        else:
            found.add("/".join([*stack[:depth], name]))
    return {m for m in found if m.split("/")[0] in PACKAGES}


@pytest.mark.parametrize(
    ("document", "heading"),
    [("README.md", "## Layout"), ("docs/architecture.md", "## Code layout")],
)
def test_the_docs_draw_every_module(document: str, heading: str) -> None:
    drawn = _drawn_modules((ROOT / document).read_text(), heading)
    modules = {path for path, _, _ in _modules() if not path.endswith("/__init__.py")}
    drawn_inits = {m for m in drawn if m.endswith("/__init__.py")}
    assert sorted(modules - drawn) == []
    assert sorted(drawn - modules - drawn_inits) == []
