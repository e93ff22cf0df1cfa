"""Pipelined sends (chat/consumers.py ``_sends``): a socket has up to CHAT_MAX_PENDING_SENDS
sends in flight, so they share group commits, and every answer keeps the client's order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.test import override_settings

from chat import ingest, protocol
from chat.assistant import replies as assistant
from chat.models import Room
from chat.services import PostRequest, PostResult
from tests.test_consumer import (
    connected,
    frames,
    quiet,
    send,
    stored_texts,
    stored_texts_eventually,
)

pytestmark = [pytest.mark.django_db(transaction=True)]


class Gate:
    """Wraps ``ingest.submit``: counts this process's sends in flight (submitted, outcome not
    yet handed back) and holds outcomes back while closed, as a slow database would."""

    def __init__(self) -> None:
        self.open = True
        self.in_flight = 0
        self.most_in_flight = 0
        self.submitted: list[str] = []
        self.held: list[Callable[[], None]] = []
        self.fail: set[str] = set()  # texts whose outcome is an unexpected error
        self.real = ingest.submit

    def submit(self, room_id: int, request: PostRequest) -> asyncio.Future[PostResult]:
        inner = self.real(room_id, request)
        outer: asyncio.Future[PostResult] = asyncio.get_running_loop().create_future()
        self.submitted.append(request.text)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        outer.add_done_callback(self._landed)
        text = request.text

        def hand_back() -> None:
            if outer.done():  # the socket went away and cancelled it
                if not inner.cancelled():
                    inner.exception()
                return
            if text in self.fail:
                outer.set_exception(RuntimeError("boom"))
            elif inner.exception() is not None:
                outer.set_exception(inner.exception())  # type: ignore[arg-type]
            else:
                outer.set_result(inner.result())

        def inner_done(_: object) -> None:
            if self.open:
                hand_back()
            else:
                self.held.append(hand_back)

        inner.add_done_callback(inner_done)
        return outer

    def _landed(self, _: object) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        self.open = False

    def release(self, newest_first: bool = False) -> None:
        self.open = True
        held, self.held = self.held, []
        for hand_back in reversed(held) if newest_first else held:
            hand_back()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    g = Gate()
    monkeypatch.setattr(ingest, "submit", g.submit)
    yield g


async def closes_with_a_logged_error(
    comm: Any, payload: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Send ``payload``; the socket closes with 1011 and logs why (with the traceback)."""
    with caplog.at_level(logging.ERROR, logger="chat.consumers"):
        await send(comm, payload)
        while True:
            output = await comm.receive_output(timeout=3)
            if output["type"] == "websocket.close":
                break
    assert output["code"] == protocol.CLOSE_INTERNAL_ERROR
    assert any("Answering a send" in r.getMessage() and r.exc_info for r in caplog.records)
    await comm.disconnect()


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def read_until(comm: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` non-ambient frames."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        got.extend(await frames(comm))
    assert len(got) == count, got
    return got


def consumer_tasks() -> list[asyncio.Task[Any]]:
    """The running tasks of a chat consumer's own coroutines (its receive loop, an assistant
    request, a close): none may outlive a socket."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "").startswith("ChatConsumer.")
    ]


@pytest.fixture
async def alice() -> User:
    return await database_sync_to_async(User.objects.create_user)("alice", password="x")


@pytest.fixture
async def lobby() -> Room:
    return await database_sync_to_async(Room.objects.create)(slug="lobby", title="Lobby")


@override_settings(CHAT_RATE_LIMIT_MESSAGES=3)
async def test_a_batch_of_sends_shares_one_transaction_and_answers_in_order(
    alice: User, lobby: Room, transactions: list[int]
) -> None:
    comm = await connected(alice, "lobby")
    # One WebSocket message: all five are submitted before the room's transaction starts.
    texts = [("a", "c0"), ("b", "c1"), ("a again", "c0"), ("c", "c2"), ("d", "c3")]
    await send(comm, [{"type": "message", "text": t, "client_id": c} for t, c in texts])
    got = await read_until(comm, 8)  # five answers, three messages
    assert transactions == [5]
    answers = [f for f in got if f["type"] != "message"]
    assert answers[:4] == [
        {"type": "ack", "client_id": "c0", "seq": 1},
        {"type": "ack", "client_id": "c1", "seq": 2},
        {"type": "ack", "client_id": "c0", "seq": 1},  # the resend: the stored message
        {"type": "ack", "client_id": "c2", "seq": 3},
    ]
    assert answers[4]["code"] == protocol.RATE_LIMITED and answers[4]["client_id"] == "c3"
    # Each message reaches its sender after its ack.
    kinds = [(f["type"], f.get("seq")) for f in got]
    for seq in (1, 2, 3):
        assert kinds.index(("ack", seq)) < kinds.index(("message", seq))
    assert await stored_texts(lobby) == ["a", "b", "c"]
    await comm.disconnect()


@override_settings(CHAT_MAX_PENDING_SENDS=3, CHAT_RATE_LIMIT_MESSAGES=1000)
async def test_a_socket_that_never_waits_has_at_most_the_bound_in_flight(
    alice: User, lobby: Room, gate: Gate
) -> None:
    comm = await connected(alice, "lobby")
    gate.close()  # the database is slow: nothing is answered
    count = 12
    for i in range(count):  # an attacker: fires sends without reading anything
        await send(comm, {"type": "message", "text": f"m{i}", "client_id": f"c{i}"})
    await until(lambda: gate.in_flight == 3, "three sends in flight")
    # At the bound the socket reads no further frame until the oldest is answered.
    assert await quiet(comm)
    assert gate.submitted == ["m0", "m1", "m2"]
    gate.release(newest_first=True)  # the answers still go out in the order sent
    got = await read_until(comm, 2 * count)
    acks = [f for f in got if f["type"] == "ack"]
    assert acks == [{"type": "ack", "client_id": f"c{i}", "seq": i + 1} for i in range(count)]
    kinds = [(f["type"], f.get("seq")) for f in got]
    for seq in range(1, count + 1):
        assert kinds.index(("ack", seq)) < kinds.index(("message", seq))
    assert gate.most_in_flight == 3
    assert gate.submitted == [f"m{i}" for i in range(count)]
    assert await stored_texts(lobby) == [f"m{i}" for i in range(count)]  # once each, in order
    await comm.disconnect()


async def test_other_frames_wait_for_the_sends_before_them(
    alice: User, lobby: Room, gate: Gate
) -> None:
    comm = await connected(alice, "lobby")
    gate.close()
    await send(comm, {"type": "message", "text": "first", "client_id": "c0"})
    await send(comm, {"type": "ping"})
    await until(lambda: gate.submitted == ["first"], "the send submitted")
    assert await quiet(comm), "no pong before the send before it is answered"
    gate.release()
    got = await read_until(comm, 3)
    assert [f["type"] for f in got] == ["ack", "message", "pong"]
    assert got[2]["last_seq"] == 1  # the pong knows the message sent before the ping
    await comm.disconnect()


async def test_a_socket_that_closes_with_sends_pending_stores_them_and_leaks_nothing(
    alice: User, lobby: Room, gate: Gate
) -> None:
    comm = await connected(alice, "lobby")
    gate.close()
    for i in range(3):
        await send(comm, {"type": "message", "text": f"m{i}", "client_id": f"c{i}"})
    await until(lambda: gate.in_flight == 3, "three sends in flight")
    await comm.disconnect()
    assert gate.in_flight == 0  # every outcome was dropped: nobody waits for an answer
    assert await stored_texts_eventually(lobby, 3) == ["m0", "m1", "m2"]
    gate.release()
    await until(lambda: not consumer_tasks(), "the consumer's tasks ended")


async def test_an_unexpected_error_in_a_pending_send_is_logged_and_closes_the_socket(
    alice: User, lobby: Room, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    comm = await connected(alice, "lobby")
    gate.fail.add("bad")
    await closes_with_a_logged_error(comm, [{"type": "message", "text": "bad"}], caplog)
    await until(lambda: not consumer_tasks(), "the consumer's tasks ended")


class HeldAssistant:
    """Stands in for ``request_reply``: each request waits until released, then refuses (an
    answer to its send, as a real refusal is) or fails unexpectedly."""

    def __init__(self, fail: bool = False) -> None:
        self.asked: list[str] = []
        self.released = asyncio.Event()
        self.fail = fail

    @classmethod
    def installed(cls, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> HeldAssistant:
        """One in place of ``request_reply`` for this test."""
        held = cls(fail)
        monkeypatch.setattr(assistant, "request_reply", held.request_reply)
        return held

    async def request_reply(self, room: Room, user: User, message: Any) -> None:
        self.asked.append(message.text)
        await self.released.wait()
        if self.fail:
            raise RuntimeError("boom")
        raise assistant.AssistantRefused(protocol.RATE_LIMITED, "Not now.")


async def test_the_answer_to_an_assistant_request_comes_before_the_sends_after_it(
    alice: User, lobby: Room, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldAssistant.installed(monkeypatch)
    comm = await connected(alice, "lobby")
    batch = [
        {"type": "message", "text": "@assistant hello", "client_id": "c0"},
        {"type": "message", "text": "after", "client_id": "c1"},
    ]
    await send(comm, batch)
    got = await read_until(comm, 2)
    assert [(f["type"], f.get("seq")) for f in got] == [("ack", 1), ("message", 1)]
    await until(lambda: held.asked == ["@assistant hello"], "the assistant asked")
    # Stored already, but its ack waits: the request's refusal answers the send before it.
    assert await stored_texts_eventually(lobby, 2) == ["@assistant hello", "after"]
    assert await quiet(comm), "no ack for the next send while the request runs"
    held.released.set()
    got = await read_until(comm, 3)
    assert [(f["type"], f.get("code"), f.get("client_id")) for f in got] == [
        ("error", protocol.RATE_LIMITED, None),
        ("ack", None, "c1"),
        ("message", None, "c1"),  # "after": held by the hub until its ack
    ]
    await comm.disconnect()
    await until(lambda: not consumer_tasks(), "the consumer's tasks ended")


async def test_a_socket_that_closes_during_an_assistant_request_cancels_it(
    alice: User, lobby: Room, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldAssistant.installed(monkeypatch)
    comm = await connected(alice, "lobby")
    await send(comm, {"type": "message", "text": "@assistant hello", "client_id": "c0"})
    await send(comm, {"type": "message", "text": "after", "client_id": "c1"})
    await until(lambda: held.asked == ["@assistant hello"], "the assistant asked")
    assert consumer_tasks(), "the request runs in a task of the consumer"
    await comm.disconnect()
    await until(lambda: not consumer_tasks(), "the request was cancelled")
    assert await stored_texts_eventually(lobby, 2) == ["@assistant hello", "after"]


async def test_an_assistant_request_that_fails_unexpectedly_closes_the_socket(
    alice: User, lobby: Room, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    held = HeldAssistant.installed(monkeypatch, fail=True)
    held.released.set()
    comm = await connected(alice, "lobby")
    await closes_with_a_logged_error(comm, {"type": "message", "text": "@assistant hi"}, caplog)


@override_settings(CHAT_MAX_PENDING_SENDS=0)
def test_the_bound_must_be_positive() -> None:
    from chat.checks import check_chat_settings

    messages = [m.msg for m in check_chat_settings() if m.id == "chat.E001"]
    assert any("CHAT_MAX_PENDING_SENDS" in m for m in messages)


@override_settings(CHAT_MAX_PENDING_SENDS=101)
def test_more_pending_sends_than_the_hub_keeps_acks_for_is_a_warning() -> None:
    from chat.checks import check_chat_settings

    assert "chat.W004" in {m.id for m in check_chat_settings()}
    with override_settings(CHAT_MAX_PENDING_SENDS=100):
        assert "chat.W004" not in {m.id for m in check_chat_settings()}
