"""Leases and rate windows in this process's memory: the same contract as Redis, one process.

Right when a site runs one process (the embedded default): nothing to install, and the
limits are exact. With several processes each counts only its own.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from .base import BaseLeaseStore, BaseRateStore, LeaseRef

Clock = Callable[[], float]
# A refused hit always waits a little, so callers never retry in a tight loop.
MIN_WAIT_SECONDS = 0.001
SWEEP_INTERVAL_SECONDS = 60.0


class MemoryLeaseStore(BaseLeaseStore):
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        # A lock, not the event loop, makes each method atomic: tests and management
        # commands may run their own loops in other threads.
        self._lock = threading.Lock()
        self._keys: dict[str, dict[str, float]] = {}  # key -> holder -> expiry (clock time)

    def _live(self, key: str, now: float) -> dict[str, float]:
        leases = self._keys.get(key, {})
        for holder in [h for h, expiry in leases.items() if expiry <= now]:
            del leases[holder]
        return leases

    async def acquire(self, key: str, holder_id: str, limit: int, ttl_seconds: float) -> bool:
        with self._lock:
            now = self._clock()
            leases = self._live(key, now)
            if holder_id not in leases and len(leases) >= limit:
                self._forget_if_empty(key)
                return False
            self._keys.setdefault(key, leases)[holder_id] = now + ttl_seconds
            return True

    async def release(self, key: str, holder_id: str) -> None:
        with self._lock:
            self._keys.get(key, {}).pop(holder_id, None)
            self._forget_if_empty(key)

    async def refresh(self, leases: Sequence[LeaseRef], ttl_seconds: float) -> int:
        with self._lock:
            now = self._clock()
            missing = 0
            for lease in leases:
                held = self._live(lease.key, now)
                missing += lease.holder_id not in held
                self._keys.setdefault(lease.key, held)[lease.holder_id] = now + ttl_seconds
            return missing

    async def count(self, key: str) -> int:
        with self._lock:
            count = len(self._live(key, self._clock()))
            self._forget_if_empty(key)
            return count

    def _forget_if_empty(self, key: str) -> None:
        if not self._keys.get(key, True):
            del self._keys[key]


class MemoryRateStore(BaseRateStore):
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (leaves the window at, event id), oldest first
        self._events: dict[str, deque[tuple[float, str]]] = {}
        self._swept_at = clock()

    async def hit(self, key: str, event_id: str, limit: int, window_seconds: float) -> float:
        with self._lock:
            now = self._clock()
            self._sweep(now)
            recent = self._events.setdefault(key, deque())
            while recent and recent[0][0] <= now:
                recent.popleft()
            if any(seen == event_id for _, seen in recent):
                return 0.0
            if len(recent) >= limit:
                return max(recent[0][0] - now, MIN_WAIT_SECONDS) if recent else MIN_WAIT_SECONDS
            recent.append((now + window_seconds, event_id))
            return 0.0

    def _sweep(self, now: float) -> None:
        # Users who stopped sending would otherwise keep their (expired) events forever.
        if now - self._swept_at < SWEEP_INTERVAL_SECONDS:
            return
        self._swept_at = now
        for key in [k for k, recent in self._events.items() if not recent or recent[-1][0] <= now]:
            del self._events[key]
