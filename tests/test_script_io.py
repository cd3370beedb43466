"""The APPLY and HOLD scripts' arguments and replies, as producer/jobs/script_io.py
types them: read back from the Lua source, so the Python side and the script cannot
drift apart. No Redis here (the store's tests run the scripts)."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from producer.core.contract import TERMINAL, Status
from producer.jobs import scripts as S
from producer.jobs.script_io import (
    ApplyArgs,
    ApplyKeys,
    Hold,
    HoldResult,
    Outcome,
    Verdict,
)


def _named(source: str, table: str) -> list[tuple[int, str]]:
    """``local <name> = <table>[<n>]`` lines, as (n, name) in source order."""
    pattern = rf"^local (\w+) = {table}\[(\d+)\]$"
    return [(int(n), name) for name, n in re.findall(pattern, source, re.MULTILINE)]


@pytest.mark.parametrize(("table", "typed"), [("ARGV", ApplyArgs), ("KEYS", ApplyKeys)])
def test_apply_slots_are_named_in_the_script_order(table: str, typed: type) -> None:
    named = _named(S.APPLY, table)
    assert [n for n, _ in named] == list(range(1, len(named) + 1))
    assert [name for _, name in named] == [f.name for f in fields(typed)]
    # Past the named lines, a slot is used only by its name: no bare ARGV[3].
    body = re.sub(rf"^local \w+ = {table}\[\d+\]$", "", S.APPLY, flags=re.MULTILINE)
    assert not re.findall(rf"{table}\[\d+\]", body)


def test_apply_events_start_after_the_named_arguments() -> None:
    first = re.search(r"for i = (\d+), #ARGV, 3 do", S.APPLY)
    assert first is not None and int(first.group(1)) == len(fields(ApplyArgs)) + 1


def test_every_apply_reply_parses() -> None:
    """Each refusal the script can give, and a status found, is a :class:`Verdict`."""
    refusals = set(re.findall(r"return \{0, '(\w+)'\}", S.APPLY))
    assert refusals == {"claimed", "__missing__", "fenced", "lease_changed", "lease_renewed"}
    for word in refusals:
        out = Outcome.parse([0, word.encode()])
        assert not out.ok and out.detail == word and out.found is None
    for status in Status:
        out = Outcome.parse([0, status.value.encode()])
        assert not out.ok and out.detail is Verdict.STATUS and out.found is status
    assert Outcome.parse([1, b"replayed"]) == Outcome(Verdict.REPLAYED)
    applied = Outcome.parse([1, b"1-0,1-1"])
    assert applied.ok and applied.detail is Verdict.APPLIED
    assert applied.event_ids == ("1-0", "1-1")
    assert Outcome.parse([1, b""]).event_ids == ()


def test_every_hold_reply_parses() -> None:
    heads = set(re.findall(r"return \{'(\w+)'", S.HOLD))
    assert heads == {"__missing__", "held", "ok"}
    assert Hold.parse([b"__missing__"]) == Hold(HoldResult.MISSING)
    assert Hold.parse([b"held", b"host:1"]) == Hold(HoldResult.HELD, holder="host:1")
    for status in TERMINAL:  # ``return {status}``: the terminal status found
        assert Hold.parse([status.value.encode()]) == Hold(HoldResult.ENDED, found=status)
    raw = [b"status", b"queued", b"doc", b'{"id": "j1"}', b"lease", b"w1", b"tag", b"t1"]
    held = Hold.parse([b"ok", raw])
    assert held.result is HoldResult.OK and held.snapshot is not None
    assert held.snapshot.status is Status.QUEUED and held.snapshot.lease == "w1"
