"""Pure presence rules: aggregation, diffs, timing and coalescing. Time is always passed in.

A *connection entry* says "this socket of this user is in this room until ``expires_at``".
Heartbeats push ``expires_at`` forward; a process killed with SIGKILL stops heartbeating, so
its entries expire on their own and every other process drops them at its next sweep.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    conn_id: str
    user_id: int
    username: str
    expires_at: float


@dataclass(frozen=True)
class UserPresence:
    id: int
    username: str
    connections: int


State = dict[int, UserPresence]


def aggregate(entries: Iterable[Entry], now: float) -> State:
    """Group live connection entries by user: one presence per user, however many tabs."""
    counts: dict[int, int] = {}
    names: dict[int, str] = {}
    seen: set[str] = set()
    for entry in entries:
        if entry.expires_at <= now or entry.conn_id in seen:
            continue
        seen.add(entry.conn_id)
        counts[entry.user_id] = counts.get(entry.user_id, 0) + 1
        names[entry.user_id] = entry.username
    return {uid: UserPresence(uid, names[uid], n) for uid, n in counts.items()}


def diff(old: State, new: State) -> tuple[list[UserPresence], list[UserPresence]]:
    """Users whose first connection arrived (joins) or last connection left (leaves)."""
    joins = sorted((new[uid] for uid in new.keys() - old.keys()), key=_order)
    leaves = sorted((old[uid] for uid in old.keys() - new.keys()), key=_order)
    return joins, leaves


def _order(user: UserPresence) -> tuple[str, int]:
    return (user.username, user.id)


def with_connection(state: State, user_id: int, username: str) -> State:
    """The state as it will be once one more connection of this user is counted."""
    current = state.get(user_id)
    updated = dict(state)
    updated[user_id] = UserPresence(user_id, username, (current.connections if current else 0) + 1)
    return updated


def keep_leavers(old: State, new: State) -> State:
    """``new`` plus the users that would leave: used while a reset store is being refilled."""
    merged = dict(new)
    for uid in old.keys() - new.keys():
        merged[uid] = old[uid]
    return merged


@dataclass(frozen=True)
class Timing:
    """Every presence interval, derived from one bound: how long a ghost may linger."""

    timeout_seconds: float

    @property
    def entry_ttl_seconds(self) -> float:
        # Long enough to survive one missed heartbeat (TTL / heartbeat ≈ 2.7)...
        return self.timeout_seconds * 2 / 3

    @property
    def heartbeat_seconds(self) -> float:
        return self.timeout_seconds / 4

    @property
    def sweep_seconds(self) -> float:
        # ...and short enough that TTL + one sweep (5/6 of the bound) stays inside the bound.
        return self.timeout_seconds / 6

    def heartbeat_delay(self, rng: random.Random) -> float:
        # Jitter so processes started together do not heartbeat in lockstep.
        return self.heartbeat_seconds * rng.uniform(0.8, 1.0)

    def expires_at(self, now: float) -> float:
        return now + self.entry_ttl_seconds


@dataclass
class Coalescer:
    """Decides when a room's presence is next recomputed and broadcast.

    The first change waits ``settle_seconds`` so a burst is gathered into one diff; after a
    broadcast the next waits at least ``min_interval_seconds``. 500 joins within a second thus
    become a handful of diff frames, and each costs one read of the room, not one per join.
    """

    settle_seconds: float
    min_interval_seconds: float
    dirty_since: float | None = None
    last_sync: float = field(default=float("-inf"))

    def mark_dirty(self, now: float) -> None:
        if self.dirty_since is None:
            self.dirty_since = now

    def due_at(self) -> float | None:
        if self.dirty_since is None:
            return None
        return max(
            self.dirty_since + self.settle_seconds, self.last_sync + self.min_interval_seconds
        )

    def synced(self, now: float) -> None:
        self.dirty_since = None
        self.last_sync = now


@dataclass
class RateGate:
    """At most one event per key per ``interval_seconds`` (typing and read relays)."""

    interval_seconds: float
    last: dict[object, float] = field(default_factory=dict)

    def allow(self, key: object, now: float) -> bool:
        previous = self.last.get(key)
        if previous is not None and now - previous < self.interval_seconds:
            return False
        self.last[key] = now
        return True

    def wait_seconds(self, key: object, now: float) -> float:
        previous = self.last.get(key)
        if previous is None:
            return 0.0
        return max(0.0, previous + self.interval_seconds - now)

    def forget(self, key: object) -> None:
        self.last.pop(key, None)
