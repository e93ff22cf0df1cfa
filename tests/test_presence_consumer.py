"""Presence, typing and read markers through the consumer, in-process (WebsocketCommunicator)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import override_settings

from chat import protocol, services
from chat.models import ReadMarker, Room
from chat.presence_hub import TYPING_STARTS_PER_INTERVAL
from chat.routing import websocket_urlpatterns

pytestmark = [pytest.mark.django_db(transaction=True)]

TIMEOUT = 3


@database_sync_to_async
def make_user(name: str) -> User:
    return User.objects.create_user(username=name, password="x")


@database_sync_to_async
def make_users(names: list[str]) -> list[User]:
    # No password hashing: 40 PBKDF2 rounds would dominate the test.
    User.objects.bulk_create([User(username=n) for n in names])
    return list(User.objects.filter(username__in=names))


@database_sync_to_async
def make_room(slug: str) -> Room:
    return Room.objects.create(slug=slug, title=slug.title())


@database_sync_to_async
def marker(room: Room, user: User) -> int | None:
    row = ReadMarker.objects.filter(room=room, user=user).first()
    return None if row is None else row.last_read_seq


class Client:
    """A communicator that keeps every frame it received, in order."""

    def __init__(self, user: User, slug: str) -> None:
        self.comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/chat/{slug}/")
        self.comm.scope["user"] = user
        self.frames: list[dict[str, Any]] = []

    async def connect(self) -> Client:
        ok, _ = await self.comm.connect(timeout=TIMEOUT)
        assert ok
        await self.until("read_state")
        return self

    async def _pull(self, timeout: float) -> None:
        data = json.loads(await self.comm.receive_from(timeout=timeout))
        self.frames.extend(data if isinstance(data, list) else [data])

    async def until(
        self, frame_type: str, timeout: float = TIMEOUT, **match: Any
    ) -> dict[str, Any]:
        """Return the first not yet consumed frame of this type (and fields), waiting for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, frame in enumerate(self.frames):
                if frame["type"] == frame_type and all(frame.get(k) == v for k, v in match.items()):
                    del self.frames[: i + 1]
                    return frame
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {frame_type} {match} in {self.frames}")
            await self._pull(remaining)

    async def drain(self, seconds: float = 0.4) -> list[dict[str, Any]]:
        """Everything that arrives within ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._pull(TIMEOUT), remaining)
            except TimeoutError:
                break
        taken, self.frames = self.frames, []
        return taken

    async def send(self, payload: Any) -> None:
        await self.comm.send_to(text_data=json.dumps(payload))

    async def close(self) -> None:
        await self.comm.disconnect()


def of_type(frames: list[dict[str, Any]], frame_type: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == frame_type]


@pytest.fixture
async def users() -> tuple[User, User]:
    return await make_user("alice"), await make_user("bob")


@pytest.fixture
async def room() -> Room:
    return await make_room("lobby")


async def test_presence_state_on_connect_and_diffs(users: tuple[User, User], room: Room) -> None:
    alice, bob = users
    a = Client(alice, "lobby")
    ok, _ = await a.comm.connect(timeout=TIMEOUT)
    assert ok
    state = await a.until("presence_state")
    assert state["users"] == [{"id": alice.pk, "username": "alice", "connections": 1}]
    assert (await a.until("read_state"))["reads"] == []

    b = await Client(bob, "lobby").connect()
    diff = await a.until("presence_diff")
    assert diff == {
        "type": "presence_diff",
        "joins": [{"id": bob.pk, "username": "bob"}],
        "leaves": [],
    }

    # A second and third tab of bob: one presence entry, and no diff for alice.
    b2 = await Client(bob, "lobby").connect()
    b3 = Client(bob, "lobby")
    await b3.comm.connect(timeout=TIMEOUT)
    state = await b3.until("presence_state")
    assert {u["username"]: u["connections"] for u in state["users"]} == {"alice": 1, "bob": 3}
    await b2.close()
    assert of_type(await a.drain(), "presence_diff") == []

    await b.close()
    await b3.close()
    leave = await a.until("presence_diff")
    assert leave["leaves"] == [{"id": bob.pk, "username": "bob"}]
    assert leave["joins"] == []
    await a.close()


async def test_burst_of_joins_is_coalesced(users: tuple[User, User], room: Room) -> None:
    alice, _ = users
    watcher = await Client(alice, "lobby").connect()
    others = await make_users([f"user{i}" for i in range(40)])
    clients = [Client(u, "lobby") for u in others]
    await asyncio.gather(*(c.connect() for c in clients))
    frames = await watcher.drain(1.0)
    diffs = of_type(frames, "presence_diff")
    joined = [u["username"] for d in diffs for u in d["joins"]]
    assert sorted(joined) == sorted(u.username for u in others), "every join is reported once"
    assert len(diffs) <= 10, f"{len(diffs)} diff frames for 40 joins"
    await asyncio.gather(*(c.close() for c in clients))
    await watcher.close()


async def test_typing_is_relayed_to_others_only_and_throttled(
    users: tuple[User, User], room: Room
) -> None:
    alice, bob = users
    a = await Client(alice, "lobby").connect()
    a2 = await Client(alice, "lobby").connect()
    b = await Client(bob, "lobby").connect()
    await a.send({"type": "typing", "active": True})
    frame = await b.until("typing")
    assert frame == {
        "type": "typing",
        "user": {"id": alice.pk, "username": "alice"},
        "active": True,
    }
    # Within the throttle interval, further "active" frames are not relayed.
    await a.send({"type": "typing", "active": True})
    await a.send({"type": "typing", "active": True})
    assert of_type(await b.drain(0.3), "typing") == []
    # Stopping is relayed at once; the typist's own tabs never see their typing.
    await a.send({"type": "typing", "active": False})
    assert (await b.until("typing"))["active"] is False
    assert of_type(await a.drain(0.2) + await a2.drain(0.1), "typing") == []
    # After a stop, a new start is relayed straight away...
    await a.send({"type": "typing", "active": True})
    assert (await b.until("typing"))["active"] is True
    # ...but toggling cannot buy relays: an attacker sent [start, stop] x 25 per message and
    # got 999 relays per member. Now a few starts per interval, each with its stop.
    for _ in range(3):
        await a.send([{"type": "typing", "active": True}, {"type": "typing", "active": False}] * 25)
    relayed = of_type(await b.drain(0.5), "typing")
    assert len(relayed) <= 2 * TYPING_STARTS_PER_INTERVAL
    await asyncio.sleep(2.0)  # the interval passes: starts are relayed again
    await a.send({"type": "typing", "active": True})
    assert (await b.until("typing"))["active"] is True
    # Disconnecting while typing clears the indicator.
    await a.close()
    assert (await b.until("typing"))["active"] is False
    await a2.close()
    await b.close()


async def test_read_markers_are_monotonic_stored_and_relayed(
    users: tuple[User, User], room: Room
) -> None:
    alice, bob = users
    for i in range(5):
        await services.apost_message(room.pk, alice, f"m{i}", f"c{i}")
    with override_settings(CHAT_READ_THROTTLE_SECONDS=0.2):
        a = await Client(alice, "lobby").connect()
        b = await Client(bob, "lobby").connect()
        await b.send({"type": "read", "seq": 3})
        relayed = await a.until("read")
        assert relayed == {"type": "read", "user": {"id": bob.pk, "username": "bob"}, "seq": 3}
        assert await marker(room, bob) == 3
        await asyncio.sleep(0.3)
        # Lower values are ignored: no relay, no change.
        await b.send({"type": "read", "seq": 2})
        assert of_type(await a.drain(0.4), "read") == []
        assert await marker(room, bob) == 3
        # Values beyond the last message are capped at it.
        await b.send({"type": "read", "seq": 99})
        assert (await a.until("read"))["seq"] == 5
        # A burst within the interval is stored once, with its latest value.
        await services.apost_message(room.pk, alice, "m5", "c5")
        await services.apost_message(room.pk, alice, "m6", "c6")
        await b.send({"type": "read", "seq": 6})
        await b.send({"type": "read", "seq": 7})
        reads = of_type(await a.drain(0.8), "read")
        assert [r["seq"] for r in reads] == [7]
        assert await marker(room, bob) == 7
        await a.close()
        await b.close()
        # New connections get the markers in read_state.
        c = Client(alice, "lobby")
        await c.comm.connect(timeout=TIMEOUT)
        state = await c.until("read_state")
        assert state["reads"] == [{"user": {"id": bob.pk, "username": "bob"}, "seq": 7}]
        await c.close()


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "typing"},
        {"type": "typing", "active": "yes"},
        {"type": "typing", "active": 1},
        {"type": "read"},
        {"type": "read", "seq": -1},
        {"type": "read", "seq": "4"},
        {"type": "read", "seq": False},
        {"type": "presence"},
        {"type": "presence_state"},
    ],
)
async def test_malformed_presence_frames_are_bad_frame(
    users: tuple[User, User], room: Room, payload: dict[str, Any]
) -> None:
    alice, _ = users
    a = await Client(alice, "lobby").connect()
    await a.send(payload)
    error = await a.until("error")
    assert error["code"] == protocol.BAD_FRAME
    await a.send({"type": "ping"})
    await a.until("pong")
    assert await marker(room, alice) is None
    await a.close()
