"""Byte bounds of server messages, the per-process send window, and endings of sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from chat import protocol
from chat.presence import UserPresence
from chat.protocol import Encoded
from chat.ratelimit import SlidingWindow
from tests.test_presence_consumer import Client, make_room, make_users

BUDGET = 65536


def sizes(messages: list[str]) -> list[int]:
    return [len(m.encode("utf-8")) for m in messages]


def test_pack_keeps_order_and_every_message_within_the_budget() -> None:
    frames = [Encoded.of({"type": "message", "seq": n, "text": "\u0001" * 2700}) for n in range(60)]
    messages = protocol.pack(frames, BUDGET)
    assert len(messages) > 1
    assert max(sizes(messages)) <= BUDGET
    decoded = [
        f for m in messages for f in (json.loads(m) if m.startswith("[") else [json.loads(m)])
    ]
    assert [f["seq"] for f in decoded] == list(range(60))


def test_pack_counts_bytes_not_characters() -> None:
    # 1,000 four-byte characters are 4,000 bytes: two do not fit 6,000 bytes together.
    frames = [Encoded.of({"t": "😀" * 1000}) for _ in range(2)]
    assert len(protocol.pack(frames, 6000)) == 2
    assert len(protocol.pack(frames, 9000)) == 1


def test_a_single_frame_over_the_budget_is_refused_not_sent() -> None:
    with pytest.raises(protocol.FrameTooLarge):
        protocol.pack([Encoded.of({"text": "x" * 100})], 50)


def test_text_limit_is_counted_once_encoded() -> None:
    limits = protocol.Limits(4000, 65536, 50, max_text_bytes=16384)
    ok = protocol.parse_frame({"type": "message", "text": "\u0001" * 2730}, limits)
    assert isinstance(ok, protocol.SendMessage)
    # 4,000 characters, but 24,000 bytes once escaped.
    refused = protocol.parse_frame({"type": "message", "text": "\u0001" * 4000}, limits)
    assert isinstance(refused, protocol.FrameError) and refused.code == protocol.TOO_LONG
    assert protocol.encoded_text_bytes('a"\u0001é') == 1 + 2 + 6 + 2


def test_text_within_cuts_at_the_encoded_limit() -> None:
    text = "ab\u0001" * 100
    cut = protocol.text_within(text, 50)
    assert protocol.encoded_text_bytes(cut) <= 50
    assert protocol.encoded_text_bytes(text[: len(cut) + 1]) > 50


def test_presence_state_is_split_into_parts_that_fit() -> None:
    users = [UserPresence(n, f"user-{n:05d}-" + "x" * 100, 1) for n in range(3000)]
    frames = protocol.presence_state_frames(users, BUDGET)
    assert len(frames) > 1
    assert all(len(protocol.encode(f).encode()) <= BUDGET for f in frames)
    assert [f["more"] for f in frames] == [True] * (len(frames) - 1) + [False]
    assert sum(len(f["users"]) for f in frames) == 3000
    assert protocol.presence_state_frames([], BUDGET) == [
        {"type": "presence_state", "users": [], "more": False}
    ]


def test_read_state_is_split_into_parts_that_fit() -> None:
    reads = [(n, "\u0001" * 150, n) for n in range(200)]
    frames = protocol.read_state_frames(reads, 16384)
    assert len(frames) > 1
    assert all(len(protocol.encode(f).encode()) <= 16384 for f in frames)
    assert sum(len(f["reads"]) for f in frames) == 200


class _Row:
    def __init__(self, text: str) -> None:
        self.id, self.seq, self.text, self.client_id = 1, 1, text, ""
        from django.utils import timezone

        self.created_at = timezone.now()


class _User:
    pk = 1

    def get_username(self) -> str:
        return "alice"


def test_an_oversized_stored_message_is_sent_truncated() -> None:
    # Stored before the byte limit existed (or by other code): it must still be deliverable.
    enc = protocol.message_encoded(_Row("\u0001" * 20000), "lobby", _User(), BUDGET)
    assert enc.size <= BUDGET
    frame = json.loads(enc.text)
    assert frame["truncated"] is True and frame["text"].startswith("\u0001")
    small = json.loads(protocol.message_encoded(_Row("hi"), "lobby", _User(), BUDGET).text)
    assert "truncated" not in small


def test_sliding_window_refuses_floods_but_not_resends() -> None:
    window = SlidingWindow(2, 10.0)
    assert not window.full("u", 0.0, "a")
    window.record("u", 0.0, "a")
    window.record("u", 1.0, "b")
    assert window.full("u", 2.0, "c")
    assert not window.full("u", 2.0, "a")  # a resend of a stored message
    assert window.retry_after("u", 2.0) == pytest.approx(8.0)
    assert not window.full("u", 10.5, "c")
    assert len(window) == 1


# --- endings of sockets (in-process) -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_socket_killed_without_disconnect_leaves_presence() -> None:
    """Daphne cancels an application that outlives its close timeout (or dies mid-resume)
    without calling disconnect(): the presence entry must go all the same."""
    alice, bob = await make_users(["alice", "bob"])
    await make_room("lobby")
    watcher = await Client(bob, "lobby").connect()
    for _ in range(3):
        victim = await Client(alice, "lobby").connect()
        await watcher.until("presence_diff")
        victim.comm.future.cancel()  # what daphne's application_close_timeout does
        with pytest.raises(asyncio.CancelledError):
            await victim.comm.future
        left = await watcher.until("presence_diff")
        assert left["leaves"] == [{"id": alice.pk, "username": "alice"}]
    await watcher.close()


@pytest.mark.django_db(transaction=True)
async def test_presence_of_a_crowded_room_arrives_in_parts(settings: Any) -> None:
    settings.CHAT_MAX_SEND_BYTES = 4096
    settings.CHAT_MAX_TEXT_BYTES = 1024
    users = await make_users([f"crowd{n:03d}" for n in range(120)])
    await make_room("lobby")
    present = [await Client(u, "lobby").connect() for u in users[:-1]]
    late = Client(users[-1], "lobby")
    ok, _ = await late.comm.connect(timeout=3)
    assert ok
    raw: list[str] = []
    names: set[str] = set()
    while True:
        text = await late.comm.receive_from(timeout=3)
        raw.append(text)
        data = json.loads(text)
        parts = [f for f in (data if isinstance(data, list) else [data])]
        states = [f for f in parts if f["type"] == "presence_state"]
        names |= {u["username"] for s in states for u in s["users"]}
        if any(s["more"] is False for s in states):
            break
    assert max(sizes(raw)) <= 4096
    assert names == {u.username for u in users}
    for client in [*present, late]:
        await client.close()


def test_sliding_window_keeps_a_bounded_number_of_keys() -> None:
    # One key per user who ever sent: a process serving many users must not keep them all.
    window = SlidingWindow(2, 10.0, max_keys=100)
    for user in range(1000):
        window.record(user, float(user), "m")
    assert len(window) <= 100
    # Keys with events still in the window are kept while the bound allows.
    assert window.full(999, 999.0, "other") is False
    window.record(999, 999.0, "n")
    assert window.full(999, 999.0, "other")
