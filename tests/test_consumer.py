"""In-process tests of the chat consumer with WebsocketCommunicator (fast; no server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser, User
from django.db import OperationalError
from django.test import override_settings

from chat import protocol, services
from chat.models import Membership, Message, Room
from chat.routing import websocket_urlpatterns

pytestmark = [pytest.mark.django_db(transaction=True)]

TIMEOUT = 3


@database_sync_to_async
def make_user(name: str) -> User:
    return User.objects.create_user(username=name, password="x")


@database_sync_to_async
def make_room(slug: str, private: bool = False, members: tuple[User, ...] = ()) -> Room:
    room = Room.objects.create(slug=slug, title=slug.title(), is_private=private)
    for member in members:
        Membership.objects.create(room=room, user=member)
    return room


@database_sync_to_async
def stored_texts(room: Room) -> list[str]:
    return list(Message.objects.filter(room=room).order_by("seq").values_list("text", flat=True))


def communicator(user: Any, slug: str, query: str = "") -> WebsocketCommunicator:
    path = f"/ws/chat/{slug}/" + (f"?{query}" if query else "")
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    comm.scope["user"] = user
    return comm


# Presence and read-marker frames arrive on their own schedule; tests of the message
# protocol skip them (tests/test_presence_consumer.py checks them).
AMBIENT = {"presence_state", "presence_diff", "read_state", "read", "typing"}


# The server batches frames into JSON arrays as they come (acks with messages, hello with
# history), so tests read frames, not WebSocket messages: the rest of a message waits on the
# communicator for the next call.
UNREAD = "_unread_frames"


async def frames(comm: WebsocketCommunicator) -> list[dict[str, Any]]:
    """The non-ambient frames already received, or those of the next message that has any."""
    buffered = getattr(comm, UNREAD, None)
    if buffered:
        setattr(comm, UNREAD, None)
        return list(buffered)
    while True:
        data = json.loads(await comm.receive_from(timeout=TIMEOUT))
        batch = data if isinstance(data, list) else [data]
        batch = [f for f in batch if f.get("type") not in AMBIENT]
        if batch:
            return batch


async def quiet(comm: WebsocketCommunicator, timeout: float = 0.2) -> bool:
    """True if nothing but ambient frames arrives within ``timeout``."""
    try:
        await asyncio.wait_for(frames(comm), timeout)
    except TimeoutError:
        return True
    return False


async def frame(comm: WebsocketCommunicator) -> dict[str, Any]:
    """The next non-ambient frame (the rest of its message stays for the next call)."""
    first, *rest = await frames(comm)
    if rest:
        setattr(comm, UNREAD, rest)
    return first


async def send(comm: WebsocketCommunicator, payload: Any) -> None:
    await comm.send_to(text_data=json.dumps(payload))


async def connected(user: Any, slug: str, query: str = "") -> WebsocketCommunicator:
    comm = communicator(user, slug, query)
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok
    hello = await frame(comm)
    assert hello["type"] == "hello"
    return comm


@pytest.fixture
async def alice() -> User:
    return await make_user("alice")


@pytest.fixture
async def bob() -> User:
    return await make_user("bob")


@pytest.fixture
async def lobby() -> AsyncIterator[Room]:
    yield await make_room("lobby")


async def close_code(comm: WebsocketCommunicator) -> int:
    ok, _ = await comm.connect(timeout=TIMEOUT)
    assert ok, "the server accepts, then closes with an application code"
    output = await comm.receive_output(timeout=TIMEOUT)
    assert output["type"] == "websocket.close"
    return int(output["code"])


async def test_anonymous_is_closed_with_4401(lobby: Room) -> None:
    assert await close_code(communicator(AnonymousUser(), "lobby")) == 4401


async def test_unknown_room_is_closed_with_4404(alice: User) -> None:
    assert await close_code(communicator(alice, "nowhere")) == 4404


async def test_private_room_needs_membership(alice: User, bob: User) -> None:
    await make_room("secret", private=True, members=(alice,))
    assert await close_code(communicator(bob, "secret")) == 4403
    comm = await connected(alice, "secret")
    await comm.disconnect()


async def test_hello_history_ack_and_broadcast(alice: User, bob: User, lobby: Room) -> None:
    a = communicator(alice, "lobby")
    assert (await a.connect(timeout=TIMEOUT))[0]
    hello = await frame(a)
    assert hello == {
        "type": "hello",
        "room": "lobby",
        "user": {"id": alice.pk, "username": "alice"},
        "last_seq": 0,
        "last_update_seq": 0,
    }
    b = await connected(bob, "lobby")

    await send(a, {"type": "message", "text": "<b>hi</b>", "client_id": "c1"})
    assert await frame(a) == {"type": "ack", "client_id": "c1", "seq": 1}
    for comm in (a, b):
        message = await frame(comm)
        assert message["type"] == "message"
        assert message["seq"] == 1
        assert message["text"] == "<b>hi</b>"
        assert message["user"] == {"id": alice.pk, "username": "alice"}
        assert message["client_id"] == "c1"
        assert message["room"] == "lobby"

    # A late joiner gets hello then the history.
    c = communicator(bob, "lobby")
    assert (await c.connect(timeout=TIMEOUT))[0]
    assert (await frame(c))["last_seq"] == 1
    history = await frames(c)
    assert [m["seq"] for m in history] == [1]
    for comm in (a, b, c):
        assert await quiet(comm)
        await comm.disconnect()


async def test_history_is_last_n_or_after(alice: User, lobby: Room) -> None:
    with override_settings(CHAT_HISTORY_LIMIT=3):
        for i in range(5):
            await services.apost_message(lobby.pk, alice, f"m{i}", f"c{i}")
        comm = await connected(alice, "lobby")
        assert [m["seq"] for m in await frames(comm)] == [3, 4, 5]
        await comm.disconnect()
        comm = await connected(alice, "lobby", "after=1")
        assert [m["seq"] for m in await frames(comm)] == [2, 3, 4, 5]
        await comm.disconnect()
        # A client ahead of the server gets nothing old, then live messages.
        comm = await connected(alice, "lobby", "after=99")
        await services.apost_message(lobby.pk, alice, "m5", "c5")
        assert (await frame(comm))["seq"] == 6
        await comm.disconnect()


async def test_bad_after_gets_an_error_and_recent_history(alice: User, lobby: Room) -> None:
    await services.apost_message(lobby.pk, alice, "one", "c1")
    comm = await connected(alice, "lobby", "after=abc")
    assert (await frame(comm))["code"] == protocol.BAD_FRAME
    assert [m["seq"] for m in await frames(comm)] == [1]
    await comm.disconnect()


async def test_idempotent_send_returns_original_ack(alice: User, lobby: Room) -> None:
    comm = await connected(alice, "lobby")
    await send(comm, {"type": "message", "text": "once", "client_id": "same"})
    first = await frame(comm)
    assert first == {"type": "ack", "client_id": "same", "seq": 1}
    assert (await frame(comm))["seq"] == 1  # the broadcast
    await send(comm, {"type": "message", "text": "once", "client_id": "same"})
    assert await frame(comm) == first
    assert await quiet(comm)
    assert await stored_texts(lobby) == ["once"]
    await comm.disconnect()


async def test_same_client_id_from_another_user_is_a_new_message(
    alice: User, bob: User, lobby: Room
) -> None:
    a = await connected(alice, "lobby")
    b = await connected(bob, "lobby")
    await send(a, {"type": "message", "text": "from a", "client_id": "x"})
    await send(b, {"type": "message", "text": "from b", "client_id": "x"})
    assert await stored_texts_eventually(lobby, 2) == ["from a", "from b"]
    await a.disconnect()
    await b.disconnect()


async def stored_texts_eventually(room: Room, count: int) -> list[str]:
    for _ in range(50):
        texts = await stored_texts(room)
        if len(texts) >= count:
            return texts
        await asyncio.sleep(0.05)
    return await stored_texts(room)


async def test_ping_pong_and_batched_frames(alice: User, lobby: Room) -> None:
    comm = await connected(alice, "lobby")
    await send(comm, {"type": "ping"})
    assert await frame(comm) == {"type": "pong", "last_seq": 0, "last_update_seq": 0}
    await send(comm, [{"type": "ping"}, {"type": "ping"}])
    assert await frame(comm) == {"type": "pong", "last_seq": 0, "last_update_seq": 0}
    assert await frame(comm) == {"type": "pong", "last_seq": 0, "last_update_seq": 0}
    await comm.disconnect()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("{oops", protocol.BAD_JSON),
        ('{"type":"dance"}', protocol.BAD_FRAME),
        ('{"type":"message","text":""}', protocol.BAD_FRAME),
        ('{"type":"message","text":7}', protocol.BAD_FRAME),
        ('{"type":"message","text":"' + "x" * 4001 + '"}', protocol.TOO_LONG),
        ("[1,2]", protocol.BAD_FRAME),
    ],
)
async def test_bad_input_is_answered_and_socket_stays_open(
    alice: User, lobby: Room, payload: str, code: str
) -> None:
    comm = await connected(alice, "lobby")
    await comm.send_to(text_data=payload)
    errors = await frames(comm)
    assert errors[0]["type"] == "error"
    assert errors[0]["code"] == code
    for extra in errors[1:]:
        assert extra["type"] == "error"
    await send(comm, {"type": "ping"})
    received = await frames(comm)
    while received[0]["type"] == "error":  # "[1,2]" yields one error per frame
        received = await frames(comm)
    assert received == [{"type": "pong", "last_seq": 0, "last_update_seq": 0}]
    assert await stored_texts(lobby) == []
    await comm.disconnect()


async def test_binary_and_oversize_messages(alice: User, lobby: Room) -> None:
    # The limits are read when a socket starts.
    with override_settings(CHAT_MAX_FRAME_BYTES=64):
        comm = await connected(alice, "lobby")
    await comm.send_to(bytes_data=b'{"type":"ping"}')
    assert (await frame(comm))["code"] == protocol.BAD_FRAME
    await send(comm, {"type": "message", "text": "y" * 100})
    assert (await frame(comm))["code"] == protocol.TOO_LARGE
    assert await stored_texts(lobby) == []
    await comm.disconnect()


async def test_rate_limit(alice: User, lobby: Room) -> None:
    with override_settings(CHAT_RATE_LIMIT_MESSAGES=2, CHAT_RATE_LIMIT_WINDOW_SECONDS=60):
        comm = await connected(alice, "lobby")
        for i in range(2):
            await send(comm, {"type": "message", "text": f"m{i}", "client_id": f"c{i}"})
            assert (await frame(comm))["type"] == "ack"
            assert (await frame(comm))["type"] == "message"
        await send(comm, {"type": "message", "text": "m2", "client_id": "c2"})
        error = await frame(comm)
        assert error["code"] == protocol.RATE_LIMITED
        assert error["client_id"] == "c2"
        # A resend of an already stored message is not a new message: still acked.
        await send(comm, {"type": "message", "text": "m0", "client_id": "c0"})
        assert await frame(comm) == {"type": "ack", "client_id": "c0", "seq": 1}
        assert await stored_texts(lobby) == ["m0", "m1"]
        await comm.disconnect()


async def test_database_trouble_is_unavailable(
    alice: User, lobby: Room, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OperationalError("database is locked")

    # Fail inside the real sync path, as a locked or unreachable database would.
    monkeypatch.setattr(services, "_recent_counts", broken)
    comm = await connected(alice, "lobby")
    await send(comm, {"type": "message", "text": "lost?", "client_id": "c9"})
    error = await frame(comm)
    assert error["code"] == protocol.UNAVAILABLE
    assert error["client_id"] == "c9"
    assert await stored_texts(lobby) == []
    assert (await services.alast_seq(lobby.pk)) == 0, "a failed send leaves no gap"
    await send(comm, {"type": "ping"})
    assert (await frame(comm))["type"] == "pong"
    await comm.disconnect()


async def test_resume_replays_without_reconnect(alice: User, lobby: Room) -> None:
    comm = await connected(alice, "lobby")
    for i in range(3):
        await services.apost_message(lobby.pk, alice, f"m{i}", f"c{i}")
    assert [(await frame(comm))["seq"] for _ in range(3)] == [1, 2, 3]
    await send(comm, {"type": "resume", "after": 1})
    assert [m["seq"] for m in await frames(comm)] == [2, 3]
    # Live messages continue after the replay with no duplicate.
    await services.apost_message(lobby.pk, alice, "m3", "c3")
    assert (await frame(comm))["seq"] == 4
    assert await quiet(comm)
    await comm.disconnect()


@database_sync_to_async
def store_silently(room: Room, user: User, count: int) -> None:
    """Store messages the way another process would, without a local broadcast."""
    for _ in range(count):
        room.refresh_from_db()
        seq = room.last_seq + 1
        Message.objects.create(room=room, seq=seq, user=user, text=f"s{seq}")
        Room.objects.filter(pk=room.pk).update(last_seq=seq)


async def test_out_of_order_live_events_are_filled_from_the_database(
    alice: User, lobby: Room
) -> None:
    comm = await connected(alice, "lobby")
    await store_silently(lobby, alice, 3)
    layer = get_channel_layer()
    assert layer is not None
    group = services.room_group(lobby.pk)

    def event(seq: int) -> dict[str, Any]:
        return {"type": "chat.message", "room_id": lobby.pk, "seq": seq, "text": f'{{"seq":{seq}}}'}

    await layer.group_send(group, event(3))
    # Seq 3 waits for 1 and 2, which never come live: they are read from the database.
    delivered: list[dict[str, Any]] = []
    while len(delivered) < 3:
        delivered += await frames(comm)
    assert [m["seq"] for m in delivered] == [1, 2, 3]
    assert delivered[2] == {"seq": 3}
    # Late and repeated events are dropped.
    await layer.group_send(group, event(2))
    await layer.group_send(group, event(3))
    assert await quiet(comm)
    await comm.disconnect()


async def test_pong_reports_the_room_last_seq_so_clients_detect_lost_broadcasts(
    alice: User, lobby: Room
) -> None:
    comm = await connected(alice, "lobby")
    # Stored by "another process" whose broadcast never arrived here.
    await store_silently(lobby, alice, 2)
    with override_settings(CHAT_PONG_SEQ_MAX_AGE_SECONDS=0):
        await send(comm, {"type": "ping"})
        assert await frame(comm) == {"type": "pong", "last_seq": 2, "last_update_seq": 0}
    await send(comm, {"type": "resume", "after": 0})
    assert [m["seq"] for m in await frames(comm)] == [1, 2]
    await comm.disconnect()


async def test_making_a_room_private_closes_the_sockets_of_non_members(
    alice: User, bob: User, lobby: Room
) -> None:
    await database_sync_to_async(Membership.objects.create)(room=lobby, user=alice)
    member = await connected(alice, "lobby")
    outsider = await connected(bob, "lobby")
    lobby.is_private = True
    await database_sync_to_async(lobby.save)()
    while True:
        output = await outsider.receive_output(timeout=TIMEOUT)
        if output["type"] == "websocket.close":
            break
    assert output["code"] == protocol.CLOSE_FORBIDDEN
    await send(member, {"type": "ping"})
    assert (await frame(member))["type"] == "pong"
    await member.disconnect()


async def test_deactivating_a_user_closes_their_sockets(alice: User, lobby: Room) -> None:
    comm = await connected(alice, "lobby")
    alice.is_active = False
    await database_sync_to_async(alice.save)()
    while True:
        output = await comm.receive_output(timeout=TIMEOUT)
        if output["type"] == "websocket.close":
            break
    assert output["code"] == protocol.CLOSE_UNAUTHENTICATED
