"""The studio page in the browser, as the studio tests read it: screenshots, waiting on a
JavaScript expression, the watched job's status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import wait_until


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_js(page: Any, expression: str, timeout: float = 120) -> Any:
    """Wait until ``expression`` is truthy in the page. (Playwright's wait_for_function
    evaluates a string, which the page's Content-Security-Policy forbids, as it should.)"""
    watched = "document.querySelector('#watch')?.innerText"
    return wait_until(
        lambda: page.evaluate(expression),
        timeout,
        interval=0.05,
        message=lambda: f"in the page: {expression}; the watch shows {page.evaluate(watched)!r}",
    )


def ended(page: Any, status: str, timeout: float = 120) -> None:
    wait_js(page, f"document.querySelector('#watch').dataset.status === '{status}'", timeout)


def status(page: Any) -> str:
    return str(page.get_attribute("#watch", "data-status"))
