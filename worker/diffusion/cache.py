"""A cache of loaded things (LoRA state dicts, ControlNet models) kept within a byte
budget: least recently used first out. One that does not fit still serves its job; it is
just not kept. Thread-safe: the worker's slots share it."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

V = TypeVar("V")


class ByteBudgetCache(Generic[V]):
    def __init__(self, max_bytes: int, what: str) -> None:
        self.max_bytes = max_bytes
        self.what = what  # for the log line of an eviction: "LoRA", "ControlNet"
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._items.values())

    def names(self) -> list[str]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._items)

    def get(self, key: str) -> V | None:
        """The value kept under ``key`` (now the most recently used), or None."""
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: str, value: V, size: int) -> None:
        """Keep ``value`` (``size`` bytes) if it fits the budget, dropping the least
        recently used until the rest fits."""
        with self._lock:
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._items.move_to_end(key)
            total = sum(n for _, n in self._items.values())
            while total > self.max_bytes:
                old, (_, n) = self._items.popitem(last=False)
                total -= n
                log.info("%s cache: dropped %s (%d bytes)", self.what, old, n)
