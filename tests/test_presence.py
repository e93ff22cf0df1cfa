"""Pure presence rules, with time passed in; and the hub against a fake clock and real stores."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from chat.presence import (
    Coalescer,
    Entry,
    RateGate,
    Timing,
    UserPresence,
    aggregate,
    diff,
    keep_leavers,
    with_connection,
)
from chat.presence_hub import PresenceHub
from chat.presence_stores.memory import MemoryPresenceStore
from chat.protocol import Encoded


def entry(conn: str, uid: int, name: str, expires: float = 100.0) -> Entry:
    return Entry(conn, uid, name, expires)


def test_three_tabs_are_one_user_with_three_connections() -> None:
    state = aggregate(
        [entry("a1", 1, "alice"), entry("a2", 1, "alice"), entry("a3", 1, "alice")], 0
    )
    assert state == {1: UserPresence(1, "alice", 3)}


def test_expired_entries_do_not_count() -> None:
    entries = [entry("a1", 1, "alice", expires=10), entry("b1", 2, "bob", expires=30)]
    assert set(aggregate(entries, now=9)) == {1, 2}
    assert set(aggregate(entries, now=10)) == {2}, "an entry expires at its expiry time"
    assert aggregate(entries, now=31) == {}


def test_duplicate_connection_entries_count_once() -> None:
    assert aggregate([entry("a1", 1, "alice"), entry("a1", 1, "alice")], 0)[1].connections == 1


def test_diff_only_first_join_and_last_leave() -> None:
    one_tab = aggregate([entry("a1", 1, "alice")], 0)
    two_tabs = aggregate([entry("a1", 1, "alice"), entry("a2", 1, "alice")], 0)
    assert diff(one_tab, two_tabs) == ([], [])
    assert diff(two_tabs, one_tab) == ([], [])
    with_bob = aggregate([entry("a1", 1, "alice"), entry("b1", 2, "bob")], 0)
    assert diff(one_tab, with_bob) == ([UserPresence(2, "bob", 1)], [])
    assert diff(with_bob, {}) == ([], [UserPresence(1, "alice", 1), UserPresence(2, "bob", 1)])


def test_with_connection_and_keep_leavers() -> None:
    state = {1: UserPresence(1, "alice", 1)}
    assert with_connection(state, 1, "alice")[1].connections == 2
    assert with_connection(state, 2, "bob")[2] == UserPresence(2, "bob", 1)
    assert state == {1: UserPresence(1, "alice", 1)}, "input is not mutated"
    assert keep_leavers(state, {}) == state
    assert keep_leavers(state, {2: UserPresence(2, "bob", 1)}).keys() == {1, 2}


def test_timing_keeps_ghosts_inside_the_bound() -> None:
    timing = Timing(60)
    # Killed right after a heartbeat: the entry lives one TTL, then waits at most one sweep.
    assert timing.entry_ttl_seconds + timing.sweep_seconds < 60
    # A single missed heartbeat does not expire a live socket.
    assert timing.entry_ttl_seconds > 2 * timing.heartbeat_seconds
    rng = random.Random(1)
    delays = [timing.heartbeat_delay(rng) for _ in range(100)]
    assert min(delays) >= 0.8 * timing.heartbeat_seconds
    assert max(delays) <= timing.heartbeat_seconds
    assert len(set(delays)) > 50, "heartbeats are jittered"
    assert timing.expires_at(1000.0) == 1000.0 + timing.entry_ttl_seconds


def test_coalescer_gathers_a_burst() -> None:
    c = Coalescer(settle_seconds=0.05, min_interval_seconds=0.25)
    assert c.due_at() is None
    c.mark_dirty(10.0)
    c.mark_dirty(10.01)
    assert c.due_at() == pytest.approx(10.05)
    c.synced(10.05)
    assert c.due_at() is None
    c.mark_dirty(10.06)
    assert c.due_at() == pytest.approx(10.30), "at most one sync per min interval"
    # Simulate 500 joins spread over one second: count the syncs the coalescer allows.
    c = Coalescer(settle_seconds=0.05, min_interval_seconds=0.25)
    syncs = 0
    for i in range(500):
        now = i / 500
        due = c.due_at()
        if due is not None and now >= due:
            c.synced(now)
            syncs += 1
        c.mark_dirty(now)
    assert 3 <= syncs <= 5


def test_rate_gate() -> None:
    gate = RateGate(2.0)
    assert gate.allow("alice", 0.0)
    assert not gate.allow("alice", 1.9)
    assert gate.wait_seconds("alice", 1.5) == pytest.approx(0.5)
    assert gate.allow("bob", 1.0), "keys are independent"
    assert gate.allow("alice", 2.0)
    gate.forget("alice")
    assert gate.allow("alice", 2.1)
    assert gate.wait_seconds("carol", 5.0) == 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Socket:
    def __init__(self) -> None:
        self.frames: list[str] = []

    async def send(self, enc: Encoded) -> None:
        self.frames.append(enc.text)


def make_hub(store: Any, layer: Any, clock: FakeClock, timeout: float = 60) -> PresenceHub:
    return PresenceHub(
        store, layer, Timing(timeout), settle_seconds=0.0, min_interval_seconds=0.0, clock=clock
    )


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_hub_state_diffs_and_expiry_of_a_dead_process() -> None:
    import json

    store = MemoryPresenceStore()
    layer = InMemoryChannelLayer()
    clock = FakeClock()
    # Two hubs sharing one store and one layer stand for two processes.
    hub_a = make_hub(store, layer, clock)
    hub_b = make_hub(store, layer, clock)
    alice, bob = Socket(), Socket()
    state = await hub_a.join(1, "a1", 1, "alice", alice.send)
    assert [u.username for u in state.values()] == ["alice"]
    state = await hub_b.join(1, "b1", 2, "bob", bob.send)
    assert sorted(u.username for u in state.values()) == ["alice", "bob"]
    await settle()
    assert [json.loads(f) for f in alice.frames] == [
        {"type": "presence_diff", "joins": [{"id": 2, "username": "bob"}], "leaves": []}
    ]
    # A second tab of alice changes nothing for bob.
    await hub_a.join(1, "a2", 1, "alice", Socket().send)
    await settle()
    assert bob.frames == []
    # Process A dies without a word: its entries stop being refreshed and expire.
    await hub_a._stop()
    hub_a.rooms.clear()
    clock.now += Timing(60).entry_ttl_seconds + 1
    await hub_b._sync(1)
    assert [json.loads(f) for f in bob.frames] == [
        {"type": "presence_diff", "joins": [], "leaves": [{"id": 1, "username": "alice"}]}
    ]
    await hub_b.leave(1, "b1")
    assert hub_b.rooms == {}
