"""Group commit (chat/ingest.py, services.post_messages): concurrent sends of a room share
transactions, and each keeps its own outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.db import OperationalError
from django.test import override_settings

from chat import ingest, protocol, services
from chat.models import Membership, Message, Room
from chat.services import PostRequest, PostResult

pytestmark = [pytest.mark.django_db(transaction=True)]


@database_sync_to_async
def make_user(name: str, **extra: Any) -> User:
    return User.objects.create_user(name, **extra)


@database_sync_to_async
def make_room(slug: str, is_private: bool = False) -> Room:
    return Room.objects.create(slug=slug, title=slug, is_private=is_private)


@database_sync_to_async
def stored(room: Room) -> list[tuple[int, str]]:
    return list(Message.objects.filter(room=room).order_by("seq").values_list("seq", "text"))


async def test_concurrent_sends_share_one_transaction_with_consecutive_seqs(
    transactions: list[int],
) -> None:
    room = await make_room("lobby")
    users = [await make_user(f"u{i}") for i in range(50)]
    results = await asyncio.gather(
        *(ingest.post(room.pk, PostRequest(u, f"m{i}", f"c{i}")) for i, u in enumerate(users))
    )
    assert [r.message.seq for r in results] == list(range(1, 51))  # in send order
    assert all(r.created for r in results)
    assert await stored(room) == [(i + 1, f"m{i}") for i in range(50)]
    assert transactions == [50]


@override_settings(CHAT_GROUP_COMMIT_MAX_MESSAGES=8, CHAT_RATE_LIMIT_MESSAGES=1000)
async def test_batches_are_bounded_and_a_lone_send_waits_for_nothing(
    transactions: list[int],
) -> None:
    room = await make_room("lobby")
    alice = await make_user("alice")
    await ingest.post(room.pk, PostRequest(alice, "alone"))
    assert transactions == [1]
    await asyncio.gather(*(ingest.post(room.pk, PostRequest(alice, f"m{i}")) for i in range(20)))
    assert transactions == [1, 8, 8, 4]
    assert [seq for seq, _ in await stored(room)] == list(range(1, 22))


@override_settings(CHAT_RATE_LIMIT_MESSAGES=3)
async def test_each_send_of_a_batch_keeps_its_own_outcome(transactions: list[int]) -> None:
    room = await make_room("secret", is_private=True)
    alice, bob, gone = await make_user("alice"), await make_user("bob"), await make_user("gone")
    for user in (alice, bob):
        await database_sync_to_async(Membership.objects.create)(room=room, user=user)
    # gone is no member: revoked. alice sends five (the limit is 3), one of them twice.
    requests = [
        PostRequest(alice, "a0", "a0"),
        PostRequest(gone, "g0", "g0"),
        PostRequest(alice, "a1", "a1"),
        PostRequest(alice, "a0 again", "a0"),  # a resend of a0 in the same batch
        PostRequest(bob, "b0", "b0"),
        PostRequest(alice, "a2", "a2"),
        PostRequest(alice, "a3", "a3"),
    ]
    outcomes = await asyncio.gather(
        *(ingest.post(room.pk, r) for r in requests), return_exceptions=True
    )
    assert transactions == [7]
    kinds = [
        (o.message.seq, o.created) if isinstance(o, PostResult) else type(o).__name__
        for o in outcomes
    ]
    assert kinds == [
        (1, True),
        "Revoked",
        (2, True),
        (1, False),
        (3, True),
        (4, True),
        "RateLimited",
    ]
    assert await stored(room) == [(1, "a0"), (2, "a1"), (3, "b0"), (4, "a2")]


async def test_a_database_failure_fails_the_whole_batch_and_leaves_no_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    room = await make_room("lobby")
    alice = await make_user("alice")

    def broken(*args: object) -> None:
        raise OperationalError("database is locked")

    monkeypatch.setattr(services, "_recent_counts", broken)
    outcomes = await asyncio.gather(
        *(ingest.post(room.pk, PostRequest(alice, f"m{i}")) for i in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(o, OperationalError) for o in outcomes)
    monkeypatch.undo()
    result = await ingest.post(room.pk, PostRequest(alice, "after"))
    assert result.message.seq == 1 and await stored(room) == [(1, "after")]


async def test_a_sender_that_goes_away_does_not_cancel_the_others() -> None:
    room = await make_room("lobby")
    alice = await make_user("alice")
    first = asyncio.ensure_future(ingest.post(room.pk, PostRequest(alice, "m0")))
    others = [
        asyncio.ensure_future(ingest.post(room.pk, PostRequest(alice, f"m{i}"))) for i in (1, 2)
    ]
    await asyncio.sleep(0)
    others[0].cancel()  # its socket closed while it waited
    done: list[PostResult] = [await first, await others[1]]
    assert [r.message.seq for r in done] == [1, 3]
    # The cancelled send was stored all the same (as a single send's transaction would be).
    assert [text for _, text in await stored(room)] == ["m0", "m1", "m2"]


class RecordingLayer:
    """Stands in for the channel layer: records each group message; ``fail`` refuses the
    first that many, as a layer that is down would."""

    def __init__(self, fail: int = 0) -> None:
        self.sent: list[dict[str, Any]] = []
        self.fail = fail

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("layer down")
        self.sent.append(message)


def recording_layer(monkeypatch: pytest.MonkeyPatch, fail: int = 0) -> RecordingLayer:
    """A RecordingLayer in place of the project's channel layer, for this test."""
    layer = RecordingLayer(fail)
    monkeypatch.setattr(services, "get_channel_layer", lambda: layer)
    return layer


async def post_concurrently(room: Room, count: int, client_ids: bool = True) -> None:
    """``count`` users each send one message to ``room`` at once (one group commit)."""
    users = [await make_user(f"u{i}") for i in range(count)]
    await asyncio.gather(
        *(
            ingest.post(room.pk, PostRequest(u, f"m{i}", f"c{i}" if client_ids else ""))
            for i, u in enumerate(users)
        )
    )


def events_of(sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for m in sent for e in (m["events"] if m["type"] == "chat.events" else [m])]


async def test_a_group_commit_reaches_the_layer_as_one_message(
    monkeypatch: pytest.MonkeyPatch, transactions: list[int]
) -> None:
    layer = recording_layer(monkeypatch)
    room = await make_room("lobby")
    await post_concurrently(room, 5)
    assert transactions == [5]
    assert len(layer.sent) == 1
    (batch,) = layer.sent
    assert batch["type"] == protocol.EVENT_BATCH and batch["room_id"] == room.pk
    assert [e["seq"] for e in batch["events"]] == [1, 2, 3, 4, 5]
    # A lone message goes as itself, as before.
    await ingest.post(room.pk, PostRequest(await make_user("alone"), "alone"))
    assert layer.sent[1]["type"] == protocol.EVENT_MESSAGE and layer.sent[1]["seq"] == 6


@override_settings(CHAT_LAYER_BATCH_MAX_BYTES=100)
async def test_layer_messages_are_bounded_in_encoded_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = recording_layer(monkeypatch)
    # 40 characters, 80 bytes each: two never share a message, though 80 characters would fit.
    texts = ["é" * 40] * 3 + ["x" * 30, "y" * 30, "z" * 30, "w" * 300]
    events = [
        {"type": protocol.EVENT_MESSAGE, "seq": i + 1, "text": t} for i, t in enumerate(texts)
    ]
    await services.abroadcast_many(7, events)
    chunks = [m["events"] if m["type"] == protocol.EVENT_BATCH else [m] for m in layer.sent]
    assert [[e["seq"] for e in c] for c in chunks] == [[1], [2], [3], [4, 5, 6], [7]]
    for chunk in chunks:
        text_bytes = sum(len(e["text"].encode()) for e in chunk)
        assert len(chunk) == 1 or text_bytes <= 100
    assert all(m["room_id"] == 7 for m in layer.sent)


@override_settings(CHAT_LAYER_BATCH_MAX_BYTES=10)
async def test_a_layer_message_refused_does_not_stop_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = recording_layer(monkeypatch, fail=1)
    events = [{"type": protocol.EVENT_MESSAGE, "seq": s, "text": "x" * 8} for s in (1, 2, 3)]
    with pytest.raises(ConnectionError):
        await services.abroadcast_many(7, events)
    assert [e["seq"] for e in events_of(layer.sent)] == [2, 3]


@override_settings(CHAT_LAYER_BATCH_MAX_BYTES=0)
async def test_a_zero_layer_bound_publishes_every_message_alone(
    monkeypatch: pytest.MonkeyPatch, transactions: list[int]
) -> None:
    # For a rolling upgrade: what a version without chat.events reads.
    layer = recording_layer(monkeypatch)
    room = await make_room("lobby")
    await post_concurrently(room, 3, client_ids=False)
    assert transactions == [3]
    assert [(m["type"], m["seq"]) for m in layer.sent] == [
        (protocol.EVENT_MESSAGE, s) for s in (1, 2, 3)
    ]


@override_settings(CHAT_LAYER_BATCH_MAX_BYTES=-1)
def test_a_negative_layer_bound_is_an_error() -> None:
    from chat.checks import check_chat_settings

    messages = [m.msg for m in check_chat_settings() if m.id == "chat.E005"]
    assert any("CHAT_LAYER_BATCH_MAX_BYTES" in m for m in messages)
