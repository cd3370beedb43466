"""tests/helpers.py's wait_until: what every poll in the suite relies on."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.helpers import wait_until


def test_returns_the_first_truthy_value() -> None:
    calls: Iterator[object] = iter([None, 0, [], "ready"])
    assert wait_until(lambda: next(calls), 5, interval=0.001) == "ready"


def test_times_out_saying_what_was_awaited_and_the_last_value() -> None:
    start = time.monotonic()
    with pytest.raises(
        AssertionError, match=r"not true after 0.2 s: the queue drains \(last value: 0\)"
    ):
        wait_until(lambda: 0, 0.2, interval=0.01, message="the queue drains")
    assert 0.2 <= time.monotonic() - start < 2


def test_a_message_callable_is_read_at_the_timeout() -> None:
    seen: list[int] = []

    def probe() -> bool:
        seen.append(len(seen))
        return False

    with pytest.raises(AssertionError, match=r"polled \d+ times$"):
        wait_until(probe, 0.05, interval=0.02, message=lambda: f"polled {len(seen)} times")
    assert len(seen) >= 2  # at least once more after the first


def test_an_error_in_the_predicate_propagates_at_once() -> None:
    def broken() -> bool:
        raise ValueError("no such worker")

    start = time.monotonic()
    with pytest.raises(ValueError, match="no such worker"):
        wait_until(broken, 30)
    assert time.monotonic() - start < 1
