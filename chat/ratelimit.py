"""A per-process sliding window that refuses obvious floods before they reach the database.

The authoritative message rate limit counts stored messages in the database (it holds across
processes and tabs). Checking it costs a transaction, so a client sending frames as fast as it
can would make every refused frame cost one. This window counts the sends *this process*
stored per user: when it alone is at the limit, the database would refuse too, so the frame
is refused here for free. Pure: time is passed in.

Each event carries a tag (the message's client_id): a resend of a message stored within the
window is not a new message (the database acks it again), so ``full`` lets its tag through.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

# Keys (users) kept at most; past it, keys whose events all expired are swept at once.
MAX_KEYS = 10_000


class SlidingWindow:
    def __init__(self, limit: int, window_seconds: float, max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self.window_seconds = window_seconds
        self.max_keys = max_keys
        # key -> (time, tag) of recorded events, oldest first; at most ``limit`` per key.
        self._events: dict[Hashable, deque[tuple[float, str]]] = {}

    def _live(self, key: Hashable, now: float) -> deque[tuple[float, str]] | None:
        events = self._events.get(key)
        if events is None:
            return None
        while events and events[0][0] <= now - self.window_seconds:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def full(self, key: Hashable, now: float, tag: str = "") -> bool:
        """Whether ``limit`` events of ``key`` already happened within the window (and
        ``tag``, when given, is not one of them)."""
        events = self._live(key, now)
        if events is None or len(events) < self.limit:
            return False
        return not tag or all(event_tag != tag for _, event_tag in events)

    def retry_after(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` has room again (0 when it has now)."""
        events = self._live(key, now)
        if events is None or len(events) < self.limit:
            return 0.0
        return max(0.0, events[0][0] + self.window_seconds - now)

    def record(self, key: Hashable, now: float, tag: str = "") -> None:
        events = self._live(key, now)
        if events is None:
            if len(self._events) >= self.max_keys:
                self._sweep(now)
            events = self._events[key] = deque(maxlen=max(self.limit, 1))
        events.append((now, tag))

    def _sweep(self, now: float) -> None:
        """Forget keys with no event left in the window; if all are live, the oldest one."""
        for key in list(self._events):
            self._live(key, now)
        if len(self._events) >= self.max_keys:
            oldest = min(self._events, key=lambda k: self._events[k][-1][0])
            del self._events[oldest]

    def __len__(self) -> int:
        return len(self._events)
