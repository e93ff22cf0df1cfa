"""Editing and deleting messages: frames, authorization, delivery order and resume (in-process).

End-to-end with daphne: tests/test_e2e_edits.py; in Chromium: tests/test_browser_edits.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import Client, override_settings

from chat import export, paging, protocol, services
from chat.consumers import _one_resume
from chat.delivery.hub import Item, RoomHub, _Room
from chat.delivery.writers import Packed
from chat.models import Message, Room
from tests.test_consumer import connected, frame, make_room, make_user, quiet, send

LIMITS = protocol.Limits(max_text_length=10, max_frame_bytes=4096, max_frames_per_message=5)


# --- frames (pure) ---------------------------------------------------------------------------


def parse(obj: Any) -> Any:
    return protocol.parse_frame(obj, LIMITS)


def test_edit_and_delete_frames_parse() -> None:
    assert parse({"type": "edit", "seq": 3, "text": "new"}) == protocol.Edit(seq=3, text="new")
    assert parse({"type": "delete", "seq": 3}) == protocol.Delete(seq=3)


@pytest.mark.parametrize("seq", [0, -1, True, "3", 2.0, None])
def test_edit_and_delete_need_a_positive_integer_seq(seq: Any) -> None:
    for obj in ({"type": "edit", "seq": seq, "text": "x"}, {"type": "delete", "seq": seq}):
        error = parse(obj)
        assert isinstance(error, protocol.FrameError)
        assert error.code == protocol.BAD_FRAME


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (None, protocol.BAD_FRAME),
        ("", protocol.BAD_FRAME),
        ("   ", protocol.BAD_FRAME),
        ("a\x00b", protocol.BAD_FRAME),
        ("x" * 11, protocol.TOO_LONG),
    ],
)
def test_edit_text_is_checked_like_a_message(text: Any, code: str) -> None:
    error = parse({"type": "edit", "seq": 4, "text": text})
    assert isinstance(error, protocol.FrameError)
    assert (error.code, error.seq) == (code, 4)


def test_edit_text_bound_is_in_encoded_bytes() -> None:
    limits = protocol.Limits(10, 4096, 5, max_text_bytes=20)
    error = protocol.parse_frame({"type": "edit", "seq": 1, "text": "\u0001" * 4}, limits)
    assert isinstance(error, protocol.FrameError) and error.code == protocol.TOO_LONG


def test_resume_takes_after_update() -> None:
    assert parse({"type": "resume", "after": 5}) == protocol.Resume(after=5, after_update=None)
    assert parse({"type": "resume", "after": 5, "after_update": 2}) == protocol.Resume(5, 2)
    error = parse({"type": "resume", "after": 5, "after_update": -1})
    assert isinstance(error, protocol.FrameError) and error.code == protocol.BAD_FRAME


def test_error_frame_names_the_message() -> None:
    assert protocol.error_frame("forbidden", "no", seq=4) == {
        "type": "error",
        "code": "forbidden",
        "message": "no",
        "seq": 4,
    }


# --- the consumer ------------------------------------------------------------------------------

pytestmark_db = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_counters() -> Iterator[None]:
    # User and room ids repeat from test to test: edit windows and cached heads must not.
    services._heads_cache.clear()
    with override_settings(CHAT_REDIS_KEY_PREFIX=f"test-{uuid.uuid4().hex[:8]}"):
        yield
    services._heads_cache.clear()


@pytest.fixture
async def alice() -> User:
    return await make_user("alice")


@pytest.fixture
async def bob() -> User:
    return await make_user("bob")


@pytest.fixture
async def lobby() -> Room:
    return await make_room("lobby")


async def post(comm: WebsocketCommunicator, text: str, cid: str) -> int:
    """Send a message; return its seq once its own message frame arrived."""
    await send(comm, {"type": "message", "text": text, "client_id": cid})
    seq = 0
    while True:
        got = await frame(comm)
        if got["type"] == "ack":
            seq = got["seq"]
        if got["type"] == "message" and got["client_id"] == cid:
            return seq or int(got["seq"])


async def next_of(comm: WebsocketCommunicator, kind: str) -> dict[str, Any]:
    while True:
        got = await frame(comm)
        if got["type"] == kind:
            return got


@database_sync_to_async
def stored(room: Room, seq: int) -> Message:
    return Message.objects.get(room=room, seq=seq)


@pytestmark_db
async def test_edit_and_delete_reach_every_socket(alice: User, bob: User, lobby: Room) -> None:
    a = await connected(alice, "lobby")
    b = await connected(bob, "lobby")
    seq = await post(a, "helo", "c1")
    assert (await next_of(b, "message"))["seq"] == seq

    await send(a, {"type": "edit", "seq": seq, "text": "hello"})
    for comm in (a, b):
        update = await next_of(comm, "message_update")
        assert set(update) == {"type", "seq", "text", "edited_at", "deleted", "update_seq"}
        assert (update["seq"], update["text"], update["deleted"]) == (seq, "hello", False)
        assert update["update_seq"] == 1 and update["edited_at"]

    await send(b, {"type": "delete", "seq": seq})
    error = await next_of(b, "error")
    assert (error["code"], error["seq"]) == ("forbidden", seq)

    await send(a, {"type": "delete", "seq": seq})
    for comm in (a, b):
        update = await next_of(comm, "message_update")
        assert (update["text"], update["deleted"], update["update_seq"]) == ("", True, 2)
    message = await stored(lobby, seq)
    assert (message.text, message.deleted, message.update_seq) == ("", True, 2)

    # A deleted message cannot be edited nor deleted again.
    await send(a, [{"type": "edit", "seq": seq, "text": "back"}, {"type": "delete", "seq": seq}])
    codes = [(await next_of(a, "error"))["code"] for _ in range(2)]
    assert codes == ["not_found", "not_found"]
    await a.disconnect()
    await b.disconnect()


@pytestmark_db
async def test_forbidden_edit_changes_nothing(alice: User, bob: User, lobby: Room) -> None:
    a = await connected(alice, "lobby")
    b = await connected(bob, "lobby")
    seq = await post(a, "mine", "c1")
    await send(b, {"type": "edit", "seq": seq, "text": "yours"})
    error = await next_of(b, "error")
    assert (error["code"], error["seq"]) == ("forbidden", seq)
    assert await quiet(a)
    message = await stored(lobby, seq)
    assert (message.text, message.update_seq, message.edited_at) == ("mine", 0, None)
    await a.disconnect()
    await b.disconnect()


@pytestmark_db
async def test_staff_may_change_any_message(alice: User, lobby: Room) -> None:
    staff = await database_sync_to_async(User.objects.create_user)("mod", is_staff=True)
    a = await connected(alice, "lobby")
    m = await connected(staff, "lobby")
    seq = await post(a, "rude", "c1")
    await send(m, {"type": "edit", "seq": seq, "text": "[removed]"})
    assert (await next_of(a, "message_update"))["text"] == "[removed]"
    await a.disconnect()
    await m.disconnect()


@pytestmark_db
async def test_unknown_seq_and_bad_frames(alice: User, lobby: Room) -> None:
    a = await connected(alice, "lobby")
    await send(a, {"type": "edit", "seq": 99, "text": "x"})
    error = await next_of(a, "error")
    assert (error["code"], error["seq"]) == ("not_found", 99)
    await send(a, {"type": "edit", "seq": "1", "text": "x"})
    assert (await next_of(a, "error"))["code"] == "bad_frame"
    await send(a, {"type": "edit", "seq": 1, "text": "x" * 4001})
    assert (await next_of(a, "error"))["code"] == "too_long"
    await a.disconnect()


@pytestmark_db
async def test_edits_are_rate_limited(alice: User, lobby: Room) -> None:
    a = await connected(alice, "lobby")
    seq = await post(a, "v0", "c1")
    with override_settings(CHAT_EDIT_RATE_LIMIT=2, CHAT_EDIT_RATE_LIMIT_WINDOW_SECONDS=120):
        await send(a, [{"type": "edit", "seq": seq, "text": f"v{n}"} for n in (1, 2, 3)])
        got = [await frame(a) for _ in range(3)]
    # The refusal is an answer: it may overtake the broadcasts of the first two.
    assert sorted(f["type"] for f in got) == ["error", "message_update", "message_update"]
    error = next(f for f in got if f["type"] == "error")
    assert (error["code"], error["seq"]) == ("rate_limited", seq)
    assert (await stored(lobby, seq)).text == "v2"
    await a.disconnect()


@pytestmark_db
async def test_resume_by_query_gets_each_change_once_in_order(
    alice: User, bob: User, lobby: Room
) -> None:
    a = await connected(alice, "lobby")
    for n in (1, 2, 3):
        await post(a, f"m{n}", f"c{n}")
    new = await post(a, "m4", "c4")
    # bob was away after seq 3 (he has 1..3 and no change).
    await send(a, {"type": "edit", "seq": 2, "text": "m2 edited"})  # update 1
    await send(a, {"type": "delete", "seq": 1})  # update 2
    await send(a, {"type": "edit", "seq": 2, "text": "m2 again"})  # update 3
    await send(a, {"type": "edit", "seq": new, "text": "m4 edited"})  # update 4
    for _ in range(4):
        await next_of(a, "message_update")

    b = await connected(bob, "lobby", "after=3&after_update=0")
    got = [await frame(b) for _ in range(3)]
    # Changes of what he has, in update_seq order (seq 2 once, at its latest), then the new
    # message with its current text and no separate update.
    assert [(f["type"], f["seq"]) for f in got] == [
        ("message_update", 1),
        ("message_update", 2),
        ("message", 4),
    ]
    assert (got[0]["update_seq"], got[0]["deleted"]) == (2, True)
    assert (got[1]["update_seq"], got[1]["text"]) == (3, "m2 again")
    assert (got[2]["text"], got[2]["update_seq"], got[2]["deleted"]) == ("m4 edited", 4, False)
    assert await quiet(b)

    # Live afterwards, once.
    await send(a, {"type": "edit", "seq": 3, "text": "m3 edited"})
    update = await next_of(b, "message_update")
    assert (update["seq"], update["update_seq"]) == (3, 5)
    assert await quiet(b)
    await send(b, {"type": "ping"})
    assert await next_of(b, "pong") == {"type": "pong", "last_seq": 4, "last_update_seq": 5}
    await a.disconnect()
    await b.disconnect()


@pytestmark_db
async def test_without_after_update_no_change_is_replayed(alice: User, lobby: Room) -> None:
    a = await connected(alice, "lobby")
    seq = await post(a, "m1", "c1")
    await send(a, {"type": "edit", "seq": seq, "text": "m1 edited"})
    await next_of(a, "message_update")
    old = await connected(alice, "lobby", f"after={seq}")
    assert await quiet(old)
    await old.disconnect()
    fresh = await connected(alice, "lobby")
    history = await frame(fresh)
    assert (history["text"], history["update_seq"]) == ("m1 edited", 1)
    assert await quiet(fresh)
    await fresh.disconnect()
    await a.disconnect()


@pytestmark_db
async def test_resume_frame_replays_changes(alice: User, bob: User, lobby: Room) -> None:
    a = await connected(alice, "lobby")
    b = await connected(bob, "lobby")
    seq = await post(a, "m1", "c1")
    await next_of(b, "message")
    await send(a, {"type": "edit", "seq": seq, "text": "m1 edited"})
    assert (await next_of(b, "message_update"))["update_seq"] == 1
    # bob asks again from before the change: he gets it again (he asked), once.
    await send(b, [{"type": "resume", "after": seq, "after_update": 0}, {"type": "ping"}])
    got = [await frame(b) for _ in range(2)]
    assert [f["type"] for f in got] == ["message_update", "pong"]
    assert got[1]["last_update_seq"] == 1
    await a.disconnect()
    await b.disconnect()


@pytestmark_db
async def test_history_page_and_export_show_changes(alice: User, lobby: Room) -> None:
    a = await connected(alice, "lobby")
    for n in (1, 2, 3):
        await post(a, f"m{n}", f"c{n}")
    await send(a, [{"type": "edit", "seq": 2, "text": "two"}, {"type": "delete", "seq": 3}])
    for _ in range(2):
        await next_of(a, "message_update")
    await a.disconnect()

    page = await sync_to_async(paging.history_page)(lobby, paging.PageParams(None, 10))
    shown = [
        (m["seq"], m["text"], m.get("deleted"), bool(m.get("edited_at"))) for m in page["messages"]
    ]
    assert shown == [(1, "m1", None, False), (2, "two", False, True), (3, "", True, True)]

    snapshot = export.RoomSnapshot(lobby.pk, "lobby", 3)
    csv_page = await sync_to_async(export.read_page)(snapshot, 0, 10, export.FORMATS["csv"])
    rows = [line.split(",") for line in csv_page.data.decode().strip().split("\r\n")]
    deleted_at = export.CSV_COLUMNS.index("deleted")
    edited_at = export.CSV_COLUMNS.index("edited_at")
    assert [r[deleted_at] for r in rows] == ["false", "false", "true"]
    assert [bool(r[edited_at]) for r in rows] == [False, True, True]
    nd = await sync_to_async(export.read_page)(snapshot, 0, 10, export.FORMATS["ndjson"])
    lines = [json.loads(line) for line in nd.data.decode().splitlines()]
    assert lines == page["messages"]


@pytestmark_db
async def test_admin_edit_and_delete_reach_open_sockets(alice: User, lobby: Room) -> None:
    staff = await database_sync_to_async(User.objects.create_superuser)("root", password="x")
    a = await connected(alice, "lobby")
    seq = await post(a, "typo", "c1")
    message = await stored(lobby, seq)

    def admin_edit_and_delete() -> tuple[int, int]:
        client = Client()
        client.force_login(staff)
        url = f"/admin/chat/message/{message.pk}/change/"
        edited = client.post(url, {"text": "fixed"}).status_code
        deleted = client.post(f"/admin/chat/message/{message.pk}/delete/", {"post": "yes"})
        return edited, deleted.status_code

    assert await sync_to_async(admin_edit_and_delete)() == (302, 302)
    first = await next_of(a, "message_update")
    second = await next_of(a, "message_update")
    assert (first["text"], first["update_seq"]) == ("fixed", 1)
    assert (second["deleted"], second["update_seq"]) == (True, 2)
    # The row stays: seq remains gap-free.
    assert (await stored(lobby, seq)).deleted
    await a.disconnect()


# --- the room hub's order of changes -------------------------------------------------------


class FakeMember:
    def __init__(self) -> None:
        self.conn_id = uuid.uuid4().hex
        self.user_id = 1
        self.session_key = ""
        self.last_sent = 0
        self.last_update = 0
        self.live = True
        self.msgpack = False
        self.got: list[dict[str, Any]] = []

    def deliver(
        self, messages: list[Packed], last_seq: int | None, last_update: int | None = None
    ) -> None:
        for packed in messages:
            decoded = json.loads(packed.text)
            self.got.extend(decoded if isinstance(decoded, list) else [decoded])
        self.last_sent = max(self.last_sent, last_seq or 0)
        self.last_update = max(self.last_update, last_update or 0)

    def congested(self) -> bool:
        return False

    def backlog_bytes(self) -> int:
        return 0

    def revoke(self, code: int) -> None:
        raise AssertionError("not revoked in these tests")


def _message_event(seq: int) -> dict[str, Any]:
    text = protocol.encode({"type": "message", "seq": seq})
    return {"type": protocol.EVENT_MESSAGE, "room_id": 1, "seq": seq, "text": text}


def _update_event(seq: int, update_seq: int) -> dict[str, Any]:
    text = protocol.encode({"type": "message_update", "seq": seq, "update_seq": update_seq})
    return {
        "type": protocol.EVENT_UPDATE,
        "room_id": 1,
        "seq": seq,
        "update_seq": update_seq,
        "text": text,
    }


async def _no_messages(room_id: int, after: int, upto: int) -> list[tuple[int, Any]]:
    return []


async def _zero(room_id: int) -> int:
    return 0


async def _value(value: int) -> int:
    return value


def make_hub(
    loads: list[tuple[int, int]], rows: list[tuple[int, int, Any]], db_head: int | None = None
) -> RoomHub:
    async def load_updates(room_id: int, after: int, upto: int) -> list[tuple[int, int, Any]]:
        loads.append((after, upto))
        return [r for r in rows if after < r[0] <= upto]

    async def allowed(room_id: int, users: set[int]) -> set[int]:
        return users

    hub = RoomHub(
        None,
        load_messages=_no_messages,
        read_head=_zero,
        allowed_users=allowed,
        budget_bytes=65536,
        batch_window_seconds=0,
        gap_grace_seconds=0.01,
        load_updates=load_updates,
        read_update_head=None if db_head is None else (lambda room_id: _value(db_head)),
    )
    hub.rooms[1] = _Room(1, ready=True, subscribed=True)
    return hub


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.03)


def kinds(member: FakeMember) -> list[tuple[str, int, int]]:
    return [(f["type"], f["seq"], f.get("update_seq", 0)) for f in member.got]


async def test_hub_holds_an_update_until_its_message() -> None:
    hub = make_hub([], [])
    member = FakeMember()
    hub.rooms[1].members[member.conn_id] = member
    hub.dispatch(_message_event(1))
    hub.dispatch(_update_event(2, 1))  # its message 2 has not come yet
    hub.dispatch(_message_event(2))
    await settle()
    assert kinds(member) == [("message", 1, 0), ("message", 2, 0), ("message_update", 2, 1)]
    assert (member.last_sent, member.last_update) == (2, 1)


async def test_hub_takes_a_batch_event_as_its_events_in_order() -> None:
    hub = make_hub([], [])
    member = FakeMember()
    hub.rooms[1].members[member.conn_id] = member
    inner = [_message_event(1), _message_event(2), _update_event(1, 1), _message_event(3)]
    hub.dispatch({"type": protocol.EVENT_BATCH, "room_id": 1, "events": inner})
    await settle()
    assert kinds(member) == [
        ("message", 1, 0),
        ("message", 2, 0),
        ("message_update", 1, 1),
        ("message", 3, 0),
    ]
    # One malformed event of a batch does not cost the others.
    broken = {"type": protocol.EVENT_MESSAGE, "room_id": 1, "seq": 4}  # no text
    hub.dispatch(
        {"type": protocol.EVENT_BATCH, "room_id": 1, "events": [broken, _message_event(4)]}
    )
    await settle()
    assert kinds(member)[-1] == ("message", 4, 0)
    # Before the room's head is read, a batch's events wait with the other early ones.
    hub.rooms[1].ready = False
    hub.dispatch({"type": protocol.EVENT_BATCH, "room_id": 1, "events": [_message_event(5)]})
    assert [e["seq"] for e in hub.rooms[1].early] == [5]


async def test_hub_orders_changes_and_drops_repeats() -> None:
    hub = make_hub([], [])
    member = FakeMember()
    hub.rooms[1].members[member.conn_id] = member
    hub.rooms[1].head = 5
    hub.dispatch(_update_event(3, 2))
    hub.dispatch(_update_event(4, 1))
    hub.dispatch(_update_event(4, 1))
    await settle()
    assert kinds(member) == [("message_update", 4, 1), ("message_update", 3, 2)]


async def test_hub_fills_a_lost_change_from_the_database() -> None:
    loads: list[tuple[int, int]] = []
    lost = protocol.Encoded.of({"type": "message_update", "seq": 1, "update_seq": 1})
    hub = make_hub(loads, [(1, 1, lost)])
    member = FakeMember()
    hub.rooms[1].members[member.conn_id] = member
    hub.rooms[1].head = 5
    hub.dispatch(_update_event(2, 2))  # update 1 never comes over the layer
    await settle()
    assert loads[0] == (0, 2)
    assert kinds(member) == [("message_update", 1, 1), ("message_update", 2, 2)]


async def test_hub_recovers_a_lost_last_change_when_told_it_exists() -> None:
    loads: list[tuple[int, int]] = []
    lost = protocol.Encoded.of({"type": "message_update", "seq": 3, "update_seq": 1})
    hub = make_hub(loads, [(1, 3, lost)])
    member = FakeMember()
    hub.rooms[1].members[member.conn_id] = member
    hub.rooms[1].head = 5
    hub.note_update_head(1, 1)  # a socket's ping read last_update_seq = 1
    await settle()
    assert kinds(member) == [("message_update", 3, 1)]
    hub.note_update_head(1, 1)
    await settle()
    assert loads == [(0, 1)]  # once: the second note changes nothing


async def test_a_stale_head_from_a_ping_skips_no_later_change() -> None:
    hub = make_hub([], [], db_head=0)  # the database was reset: it holds no change
    member = FakeMember()
    hub.rooms[1].members[member.conn_id] = member
    hub.rooms[1].head = 5
    hub.note_update_head(1, 7)  # read before the reset, still cached
    await settle()
    hub.dispatch(_update_event(2, 1))
    await settle()
    assert kinds(member) == [("message_update", 2, 1)]


async def test_hub_skips_updates_a_catching_up_socket_already_has() -> None:
    hub = make_hub([], [])
    member = FakeMember()
    member.last_sent, member.last_update = 5, 1  # it replayed update 1 from the database
    hub.rooms[1].members[member.conn_id] = member
    hub.rooms[1].head = 5
    hub.dispatch(_update_event(2, 1))
    hub.dispatch(_update_event(3, 2))
    await settle()
    assert kinds(member) == [("message_update", 3, 2)]


def test_item_defaults_are_not_updates() -> None:
    assert Item(protocol.Encoded.of({"type": "x"})).update_seq is None


def test_several_resumes_in_one_message_merge_their_after_update() -> None:
    frames: list[Any] = [protocol.Resume(5, 3), protocol.Ping(), protocol.Resume(2, None)]
    assert _one_resume(frames) == [protocol.Ping(), protocol.Resume(2, 3)]


def test_message_update_fits_the_send_budget_whatever_was_stored() -> None:
    class Changed:
        seq = 4
        text = "\u0001" * 20000  # 6 bytes each once escaped: far over the budget
        edited_at = None
        deleted = False
        update_seq = 3

    budget = 4096
    enc = protocol.message_update_encoded(Changed(), budget)
    frame = json.loads(enc.text)
    assert enc.size <= budget
    assert frame["truncated"] is True and frame["text"] == "\u0001" * len(frame["text"])
    assert (frame["seq"], frame["update_seq"]) == (4, 3)
    small = json.loads(
        protocol.message_update_encoded(type("M", (Changed,), {"text": "hi"})(), budget).text
    )
    assert "truncated" not in small


@pytestmark_db
async def test_an_edit_by_a_removed_member_closes_the_socket(alice: User) -> None:
    secret = await make_room("secret", private=True, members=(alice,))
    a = await connected(alice, "secret")
    seq = await post(a, "mine", "c1")
    await database_sync_to_async(lambda: secret.memberships.filter(user=alice).delete())()
    await send(a, {"type": "edit", "seq": seq, "text": "still mine?"})
    while True:
        output = await a.receive_output(timeout=3)
        if output["type"] == "websocket.close":
            break
    assert output["code"] == 4403
    assert (await stored(secret, seq)).text == "mine"


@pytestmark_db
async def test_admin_bulk_delete_marks_messages_deleted(alice: User, lobby: Room) -> None:
    staff = await database_sync_to_async(User.objects.create_superuser)("root", password="x")
    a = await connected(alice, "lobby")
    seqs = [await post(a, f"m{n}", f"c{n}") for n in (1, 2, 3)]
    ids = [(await stored(lobby, seq)).pk for seq in seqs[:2]]

    def bulk_delete() -> int:
        client = Client()
        client.force_login(staff)
        form = {"action": "delete_selected", "_selected_action": ids, "post": "yes"}
        return client.post("/admin/chat/message/", form).status_code

    assert await sync_to_async(bulk_delete)() == 302
    updates = [await next_of(a, "message_update") for _ in range(2)]
    assert sorted(u["seq"] for u in updates) == seqs[:2]
    assert all(u["deleted"] for u in updates)
    rows = [await stored(lobby, seq) for seq in seqs]
    assert [m.deleted for m in rows] == [True, True, False]
    await a.disconnect()
