"""Per-user quotas of the private assistant panel, counted in this process. Pure: time is
passed in.

Each open stream holds a slot until it ends; each start counts in a sliding window. Counting
per process keeps the panel free of shared state: with P processes a user gets at most P
times the limits, which still bounds what one looping client can cost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

BUSY = "assistant_busy"
RATE_LIMITED = "rate_limited"


@dataclass
class StreamQuota:
    max_open: int
    max_starts: int
    window_seconds: float
    open: dict[int, int] = field(default_factory=dict)
    starts: dict[int, deque[float]] = field(default_factory=dict)

    def acquire(self, user_id: int, now: float) -> tuple[str, float] | None:
        """Take a slot for a new stream, or return (error code, seconds to wait)."""
        recent = self.starts.setdefault(user_id, deque())
        while recent and recent[0] <= now - self.window_seconds:
            recent.popleft()
        if self.open.get(user_id, 0) >= self.max_open:
            return BUSY, 1.0
        if len(recent) >= self.max_starts:
            return RATE_LIMITED, recent[0] + self.window_seconds - now
        recent.append(now)
        self.open[user_id] = self.open.get(user_id, 0) + 1
        return None

    def release(self, user_id: int) -> None:
        left = self.open.get(user_id, 0) - 1
        if left > 0:
            self.open[user_id] = left
        else:
            self.open.pop(user_id, None)
            if not self.starts.get(user_id):
                self.starts.pop(user_id, None)
