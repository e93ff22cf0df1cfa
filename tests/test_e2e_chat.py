"""The chat WebSocket protocol end to end: a real daphne process, a real websockets client.

docs/protocol.md is the spec. Each test starts daphne on its own SQLite file (the error-case
tests share one, since a rejected frame stores nothing) and logs in through the login form.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from tests.conftest import base_env, copy_sqlite
from tests.servers import (
    ChatClient,
    DaphneServer,
    login,
    login_sync,
    recv_chat_frames,
    recv_frames,
    seed_messages,
    ws_connect,
)

pytestmark = [pytest.mark.e2e]

MESSAGE_KEYS = {"type", "seq", "id", "room", "user", "text", "client_id", "created_at"}


def stored(env: dict[str, str], room: str = "lobby") -> list[tuple[int, str, str, str]]:
    """(seq, username, text, client_id) of every stored message of a room, read directly."""
    with sqlite3.connect(env["SQLITE_PATH"]) as conn:
        rows = conn.execute(
            "SELECT m.seq, u.username, m.text, m.client_id FROM chat_message m "
            "JOIN chat_room r ON r.id = m.room_id JOIN auth_user u ON u.id = m.user_id "
            "WHERE r.slug = ? ORDER BY m.seq",
            (room,),
        ).fetchall()
    conn.close()
    return rows


def stored_last_seq(env: dict[str, str], room: str = "lobby") -> int:
    with sqlite3.connect(env["SQLITE_PATH"]) as conn:
        (value,) = conn.execute("SELECT last_seq FROM chat_room WHERE slug = ?", (room,)).fetchone()
    conn.close()
    return int(value)


def assert_message_frame(frame: dict[str, Any], seq: int, username: str, text: str) -> None:
    assert set(frame) == MESSAGE_KEYS, frame
    assert frame["type"] == "message"
    assert frame["seq"] == seq
    assert isinstance(frame["id"], int)
    assert frame["room"] == "lobby"
    assert frame["user"]["username"] == username
    assert isinstance(frame["user"]["id"], int)
    assert frame["text"] == text
    created = datetime.fromisoformat(frame["created_at"])
    assert created.utcoffset() is not None, "created_at must carry its UTC offset"


# --- connecting ------------------------------------------------------------------------------


async def test_hello_frame_shape(daphne: DaphneServer) -> None:
    cookie = await login(daphne.base_url, "alice")
    ws = await ws_connect(daphne, "/ws/chat/lobby/", cookie)
    # hello is the first WebSocket message, alone.
    frames = await recv_frames(ws)
    assert len(frames) == 1
    hello = frames[0]
    assert set(hello) == {"type", "room", "user", "last_seq", "last_update_seq"}
    assert hello["type"] == "hello"
    assert hello["room"] == "lobby"
    assert set(hello["user"]) == {"id", "username"}
    assert hello["user"]["username"] == "alice"
    assert isinstance(hello["user"]["id"], int)
    assert hello["last_seq"] == 0
    # An empty room sends no history: the next frame answers our ping.
    await ws.send('{"type":"ping"}')
    assert await recv_chat_frames(ws) == [{"type": "pong", "last_seq": 0, "last_update_seq": 0}]
    await ws.close()


async def test_hello_user_id_is_the_logged_in_user(daphne: DaphneServer) -> None:
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))
    assert alice.hello["user"]["username"] == "alice"
    assert bob.hello["user"]["username"] == "bob"
    assert alice.hello["user"]["id"] != bob.hello["user"]["id"]
    await alice.post("hi", "c1")
    frame = await bob.wait_for(lambda f: f["type"] == "message")
    assert frame["user"] == alice.hello["user"]


async def close_code(server: DaphneServer, path: str, cookie: str | None) -> int:
    """Connect and return the close code the server ends the connection with."""
    ws = await ws_connect(server, path, cookie)
    with pytest.raises(ConnectionClosed) as info:
        await recv_chat_frames(ws, timeout=5)
    assert info.value.rcvd is not None, "the server closed without a close frame"
    return info.value.rcvd.code


async def test_close_4401_without_session(daphne: DaphneServer) -> None:
    assert await close_code(daphne, "/ws/chat/lobby/", None) == 4401
    assert await close_code(daphne, "/ws/chat/lobby/", "sessionid=not-a-session") == 4401


async def test_close_4401_after_logout(daphne: DaphneServer) -> None:
    cookie = await login(daphne.base_url, "alice")
    async with httpx.AsyncClient(base_url=daphne.base_url) as client:
        token = cookie.split("csrftoken=")[1]
        response = await client.post(
            "/accounts/logout/",
            headers={"Cookie": cookie},
            data={"csrfmiddlewaretoken": token},
        )
        assert response.status_code == 302
    assert await close_code(daphne, "/ws/chat/lobby/", cookie) == 4401


async def test_close_4403_private_room_without_membership(daphne: DaphneServer) -> None:
    bob = await login(daphne.base_url, "bob")
    assert await close_code(daphne, "/ws/chat/secret/", bob) == 4403
    # A member gets in.
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"), room="secret")
    assert alice.hello["room"] == "secret"
    await alice.close()


async def test_close_4404_no_such_room(daphne: DaphneServer) -> None:
    alice = await login(daphne.base_url, "alice")
    assert await close_code(daphne, "/ws/chat/no-such-room/", alice) == 4404
    # Without a session, every room looks the same: nobody can probe which slugs exist.
    assert await close_code(daphne, "/ws/chat/no-such-room/", None) == 4401


# --- history ---------------------------------------------------------------------------------


async def test_history_is_the_last_50_in_order(daphne: DaphneServer, sqlite_env: dict) -> None:
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    for n in range(1, 56):
        ack = await alice.post(f"message {n}", f"c{n}")
        assert ack == {"type": "ack", "client_id": f"c{n}", "seq": n}

    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))
    assert bob.hello["last_seq"] == 55
    await bob.wait_seq(55)
    history = bob.messages()
    assert [f["seq"] for f in history] == list(range(6, 56))
    for frame in history:
        assert_message_frame(frame, frame["seq"], "alice", f"message {frame['seq']}")
        assert frame["client_id"] == f"c{frame['seq']}"
    # Nothing more than those 50.
    assert await bob.ping() == []
    assert len(bob.messages()) == 50


async def test_history_after_n(daphne: DaphneServer, sqlite_env: dict[str, str]) -> None:
    # Stored before any client connects, 60 > the 50 sent without `after`.
    seed_messages(sqlite_env, "lobby", 60, username="carol")
    cookie = await login(daphne.base_url, "alice")

    async def history(query: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The hello frame, and every frame before the answer to a ping."""
        client = await ChatClient.open(daphne, cookie, query=query)
        await client.ping()
        await client.close()
        return client.hello, [f for f in client.log if f["type"] not in ("hello", "pong")]

    hello, frames = await history("after=57")
    assert hello["last_seq"] == 60
    assert [f["seq"] for f in frames if f["type"] == "message"] == [58, 59, 60]
    assert [f["text"] for f in frames if f["type"] == "message"] == [
        "seeded 58",
        "seeded 59",
        "seeded 60",
    ]

    _, frames = await history("after=0")
    assert [f["seq"] for f in frames if f["type"] == "message"] == list(range(1, 61))

    _, frames = await history("after=60")
    assert frames == []

    # A client ahead of the server (its database was reset) gets nothing and sees last_seq.
    hello, frames = await history("after=1000")
    assert hello["last_seq"] == 60
    assert frames == []


@pytest.mark.parametrize("query", ["after=-1", "after=abc", "after="])
async def test_bad_after_query_is_bad_frame_then_recent_history(
    daphne: DaphneServer, sqlite_env: dict[str, str], query: str
) -> None:
    seed_messages(sqlite_env, "lobby", 55)
    client = await ChatClient.open(daphne, await login(daphne.base_url, "alice"), query=query)
    error = await client.next_frame()
    if query == "after=":
        # An empty value is no `after` at all: recent history, no error.
        assert error["type"] == "message", error
    else:
        assert error["type"] == "error" and error["code"] == "bad_frame", error
    await client.wait_seq(55)
    assert client.seqs() == list(range(6, 56))


# --- sending ---------------------------------------------------------------------------------


async def test_live_delivery_and_ack(daphne: DaphneServer, sqlite_env: dict[str, str]) -> None:
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))

    ack = await alice.post("hello bob", "a-1")
    assert ack == {"type": "ack", "client_id": "a-1", "seq": 1}
    to_bob = await bob.next_frame()
    assert_message_frame(to_bob, 1, "alice", "hello bob")
    assert to_bob["client_id"] == "a-1"
    # The sender receives its own message too (other tabs of the same user need it).
    own = await alice.wait_for(lambda f: f["type"] == "message")
    assert own == to_bob

    ack = await bob.post("hi alice", "b-1")
    assert ack == {"type": "ack", "client_id": "b-1", "seq": 2}
    to_alice = await alice.wait_for(lambda f: f["type"] == "message")
    assert_message_frame(to_alice, 2, "bob", "hi alice")

    # Without client_id: the ack and the message carry null.
    await alice.send({"type": "message", "text": "anonymous"})
    ack = await alice.wait_for(lambda f: f["type"] == "ack")
    assert ack == {"type": "ack", "client_id": None, "seq": 3}
    frame = await bob.wait_for(lambda f: f["type"] == "message" and f["seq"] == 3)
    assert frame["text"] == "anonymous" and frame["client_id"] is None

    assert stored(sqlite_env) == [
        (1, "alice", "hello bob", "a-1"),
        (2, "bob", "hi alice", "b-1"),
        (3, "alice", "anonymous", ""),
    ]


async def test_messages_stay_in_their_room(daphne: DaphneServer) -> None:
    alice_cookie = await login(daphne.base_url, "alice")
    in_secret = await ChatClient.open(daphne, alice_cookie, room="secret")
    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))
    ack = await in_secret.post("for members only", "s-1")
    assert ack["seq"] == 1
    ack = await bob.post("lobby talk", "l-1")
    assert ack["seq"] == 1, "seq is per room"
    await bob.wait_seq(1)
    await bob.ping()
    assert [f["text"] for f in bob.messages()] == ["lobby talk"]
    assert all(f["room"] == "lobby" for f in bob.messages())
    await in_secret.ping()
    assert [f["text"] for f in in_secret.messages()] == ["for members only"]


async def test_idempotent_resend(daphne: DaphneServer, sqlite_env: dict[str, str]) -> None:
    alice_cookie = await login(daphne.base_url, "alice")
    alice = await ChatClient.open(daphne, alice_cookie)
    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))

    first = await alice.post("only once", "same-id")
    assert first == {"type": "ack", "client_id": "same-id", "seq": 1}
    again = await alice.post("only once", "same-id")
    assert again == first
    # Even with another text, the client_id names the message already stored.
    third = await alice.post("changed text", "same-id")
    assert third == first
    # After a reconnect (the usual case: the ack was lost with the connection).
    alice2 = await ChatClient.open(daphne, alice_cookie)
    assert await alice2.post("only once", "same-id") == first

    assert (await alice.post("next", "other-id"))["seq"] == 2
    await bob.wait_seq(2)
    assert bob.seqs() == [1, 2], "bob got the resent message again"
    # The same client_id from another user is another message.
    assert (await bob.post("bob's own", "same-id"))["seq"] == 3

    fresh = await ChatClient.open(daphne, alice_cookie, query="after=0")
    await fresh.wait_seq(3)
    await fresh.ping()
    assert fresh.seqs() == [1, 2, 3]
    assert [f["text"] for f in fresh.messages()] == ["only once", "next", "bob's own"]
    assert len(stored(sqlite_env)) == 3


async def test_ping_pong(daphne: DaphneServer) -> None:
    ws = await ws_connect(daphne, "/ws/chat/lobby/", await login(daphne.base_url, "alice"))
    await recv_chat_frames(ws)
    for _ in range(3):
        await ws.send('{"type":"ping"}')
        assert await recv_chat_frames(ws) == [{"type": "pong", "last_seq": 0, "last_update_seq": 0}]
    # The pong's last_seq is never below what this socket delivered.
    client = ChatClient(ws)
    await client.post("hi", "c1")
    await client.wait_seq(1)
    await client.send({"type": "ping"})
    assert await client.wait_for(lambda f: f["type"] == "pong") == {
        "type": "pong",
        "last_seq": 1,
        "last_update_seq": 0,
    }
    await ws.close()


async def test_array_of_client_frames(daphne: DaphneServer, sqlite_env: dict[str, str]) -> None:
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    await alice.ws.send('[{"type":"ping"},{"type":"ping"}]')
    assert await alice.next_frame() == {"type": "pong", "last_seq": 0, "last_update_seq": 0}
    assert await alice.next_frame() == {"type": "pong", "last_seq": 0, "last_update_seq": 0}

    # Frames are handled in order, and a bad one does not stop the others.
    batch = [
        {"type": "message", "text": "one", "client_id": "b1"},
        {"type": "bogus"},
        {"type": "message", "text": "two", "client_id": "b2"},
        {"type": "ping"},
    ]
    before = len(alice.log)
    await alice.send(batch)
    await alice.wait_for(lambda f: f["type"] == "pong")
    # The answers to the batch, whatever else the room sent meanwhile (presence, markers).
    answers = [f for f in alice.log[before:] if f["type"] in ("ack", "error", "pong")]
    assert [(f["type"], f.get("client_id"), f.get("code")) for f in answers] == [
        ("ack", "b1", None),
        ("error", None, "bad_frame"),
        ("ack", "b2", None),
        ("pong", None, None),
    ]
    assert [f["seq"] for f in answers if f["type"] == "ack"] == [1, 2]
    # The broadcast of "two" may come before the pong or after it.
    if 2 not in alice.seqs():
        await alice.wait_seq(2)
    assert alice.seqs() == [1, 2]
    assert [row[2] for row in stored(sqlite_env)] == ["one", "two"]


async def test_html_comes_back_verbatim(daphne: DaphneServer, sqlite_env: dict[str, str]) -> None:
    text = "<script>alert('x')</script> &amp; <b>bold</b> \"q\" é 😀 \\n"
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    bob_cookie = await login(daphne.base_url, "bob")
    bob = await ChatClient.open(daphne, bob_cookie)
    await alice.post(text, "html")
    live = await bob.wait_for(lambda f: f["type"] == "message")
    assert live["text"] == text
    later = await ChatClient.open(daphne, bob_cookie)
    assert (await later.wait_for(lambda f: f["type"] == "message"))["text"] == text
    assert stored(sqlite_env)[0][2] == text


async def test_resume_frame_replays_without_reconnect(daphne: DaphneServer) -> None:
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    bob = await ChatClient.open(daphne, await login(daphne.base_url, "bob"))
    for n in range(1, 6):
        await bob.post(f"m{n}", f"m{n}")
    await alice.wait_seq(5)
    assert alice.seqs() == [1, 2, 3, 4, 5]

    await alice.send({"type": "resume", "after": 2})
    await alice.wait_seq(5)
    assert alice.seqs() == [1, 2, 3, 4, 5, 3, 4, 5]
    # Live delivery continues after the replay, without duplicates.
    await bob.post("m6", "m6")
    await alice.wait_seq(6)
    assert await alice.ping() == []
    assert alice.seqs() == [1, 2, 3, 4, 5, 3, 4, 5, 6]

    # Resuming at or past the end sends nothing.
    await alice.send({"type": "resume", "after": 6})
    assert await alice.ping() == []
    await alice.send({"type": "resume", "after": 100})
    assert await alice.ping() == []
    await bob.post("m7", "m7")
    await alice.wait_seq(7)
    assert alice.seqs()[-1] == 7 and alice.seqs().count(7) == 1


async def test_text_limits_are_characters(daphne: DaphneServer, sqlite_env: dict) -> None:
    alice = await ChatClient.open(daphne, await login(daphne.base_url, "alice"))
    assert (await alice.post("x" * 4000, "ascii-4000"))["type"] == "ack"
    # 4000 characters of 4 bytes each: the limit counts characters, not bytes.
    assert (await alice.post("😀" * 4000, "emoji-4000"))["type"] == "ack"
    error = await alice.post("😀" * 4001, "emoji-4001")
    assert error["code"] == "too_long"
    assert (await alice.post("x", "k" * 64))["type"] == "ack"
    assert [len(row[2]) for row in stored(sqlite_env)] == [4000, 4000, 1]


# --- rejected frames -------------------------------------------------------------------------

LONG_CLIENT_ID = json.dumps({"type": "message", "text": "hi", "client_id": "k" * 65})
LONG_TEXT = json.dumps({"type": "message", "text": "y" * 4001, "client_id": "c-l"})

ERROR_CASES: list[tuple[str, str | bytes, str, str | None]] = [
    # (id, what is sent, expected code, expected client_id in the error)
    ("not-json", "{not json", "bad_json", None),
    ("empty-message", "", "bad_json", None),
    ("truncated-array", '[{"type":"ping"}', "bad_json", None),
    ("unknown-type", '{"type":"shout","text":"hi"}', "bad_frame", None),
    ("missing-type", '{"text":"hi","client_id":"c"}', "bad_frame", None),
    ("type-not-string", '{"type":5}', "bad_frame", None),
    ("text-not-string", '{"type":"message","text":5,"client_id":"c-int"}', "bad_frame", "c-int"),
    ("text-missing", '{"type":"message","client_id":"c-none"}', "bad_frame", "c-none"),
    ("client-id-not-string", '{"type":"message","text":"hi","client_id":5}', "bad_frame", None),
    ("empty-text", '{"type":"message","text":"","client_id":"c-empty"}', "bad_frame", "c-empty"),
    ("blank-text", '{"type":"message","text":" \\n\\t ","client_id":"c-ws"}', "bad_frame", "c-ws"),
    ("nul-in-text", '{"type":"message","text":"a\\u0000b","client_id":"c-0"}', "bad_frame", "c-0"),
    ("client-id-65", LONG_CLIENT_ID, "bad_frame", None),
    ("number", "42", "bad_frame", None),
    ("string", '"ping"', "bad_frame", None),
    ("null", "null", "bad_frame", None),
    ("empty-array", "[]", "bad_frame", None),
    ("array-of-number", "[1]", "bad_frame", None),
    ("nested-array", '[[{"type":"ping"}]]', "bad_frame", None),
    ("51-frames", json.dumps([{"type": "ping"}] * 51), "bad_frame", None),
    ("resume-negative", '{"type":"resume","after":-1}', "bad_frame", None),
    ("resume-bool", '{"type":"resume","after":true}', "bad_frame", None),
    ("resume-string", '{"type":"resume","after":"3"}', "bad_frame", None),
    ("binary", b'{"type":"ping"}', "bad_frame", None),
    ("too-long", LONG_TEXT, "too_long", "c-l"),
]  # fmt: skip


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> dict:
    path = tmp_path_factory.mktemp("errors") / "chat.sqlite3"
    copy_sqlite(sqlite_template, path)
    return base_env(SQLITE_PATH=str(path))


@pytest.fixture(scope="module")
def shared_daphne(shared_env: dict[str, str]) -> Iterator[DaphneServer]:
    """One daphne for the error cases: a rejected frame changes nothing that others see."""
    server = DaphneServer(shared_env)
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def shared_cookie(shared_daphne: DaphneServer) -> str:
    return login_sync(shared_daphne.base_url, "alice")


@pytest.mark.parametrize(
    ("sent", "code", "client_id"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
async def test_rejected_frame(
    shared_daphne: DaphneServer,
    shared_env: dict[str, str],
    shared_cookie: str,
    sent: str | bytes,
    code: str,
    client_id: str | None,
) -> None:
    before = stored_last_seq(shared_env)
    ws = await ws_connect(shared_daphne, "/ws/chat/lobby/", shared_cookie)
    assert (await recv_chat_frames(ws))[0]["type"] == "hello"
    await ws.send(sent)
    frames = await recv_chat_frames(ws)
    assert len(frames) == 1, frames
    error = frames[0]
    assert error["type"] == "error"
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    expected_keys = {"type", "code", "message"} | ({"client_id"} if client_id else set())
    assert set(error) == expected_keys, error
    assert error.get("client_id") == client_id
    # The socket stays open and usable.
    await ws.send('{"type":"ping"}')
    assert await recv_chat_frames(ws) == [{"type": "pong", "last_seq": 0, "last_update_seq": 0}]
    await ws.close()
    assert stored_last_seq(shared_env) == before == 0
    assert stored(shared_env) == []


# A lone UTF-16 surrogate is valid JSON ("\ud800") but no valid text: it cannot be stored or
# encoded as UTF-8. Today the consumer crashes on it (UnicodeEncodeError in post_message) and
# daphne closes the socket with 1011, instead of answering bad_frame.
SURROGATE_CASES = {
    "surrogate-in-text": '{"type":"message","text":"a\\ud800b","client_id":"c-s"}',
    "surrogate-in-client-id": '{"type":"message","text":"ok","client_id":"c\\udc80"}',
}


@pytest.mark.parametrize("sent", SURROGATE_CASES.values(), ids=SURROGATE_CASES.keys())
async def test_lone_surrogate_is_bad_frame(
    shared_daphne: DaphneServer, shared_env: dict[str, str], shared_cookie: str, sent: str
) -> None:
    client = ChatClient(await ws_connect(shared_daphne, "/ws/chat/lobby/", shared_cookie))
    assert (await client.next_frame())["type"] == "hello"
    await client.ws.send(sent)
    answer = await client.next_frame()
    assert answer["type"] == "error" and answer["code"] == "bad_frame", answer
    assert await client.ping() == []
    await client.close()
    assert stored(shared_env) == []


async def test_too_large_below_daphne_limit(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    server = start_daphne({**sqlite_env, "CHAT_MAX_FRAME_BYTES": "4096"})
    ws = await ws_connect(server, "/ws/chat/lobby/", await login(server.base_url, "alice"))
    await recv_chat_frames(ws)
    await ws.send(json.dumps({"type": "message", "text": "é" * 2100, "client_id": "big"}))
    frames = await recv_chat_frames(ws)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "too_large")]
    await ws.send('{"type":"ping"}')
    assert await recv_chat_frames(ws) == [{"type": "pong", "last_seq": 0, "last_update_seq": 0}]
    assert stored(sqlite_env) == []
    await ws.close()


async def test_message_over_64_kib_closes_1009(daphne: DaphneServer, sqlite_env: dict) -> None:
    cookie = await login(daphne.base_url, "alice")
    ws = await ws_connect(daphne, "/ws/chat/lobby/", cookie)
    await recv_chat_frames(ws)
    # Exactly 64 KiB still reaches the consumer, which refuses the text as too long.
    exact = json.dumps({"type": "message", "text": "", "client_id": "exact"})
    exact = exact.replace('"text": ""', '"text": "' + "z" * (65536 - len(exact)) + '"')
    assert len(exact.encode()) == 65536
    await ws.send(exact)
    assert [f["code"] for f in await recv_chat_frames(ws)] == ["too_long"]

    await ws.send(json.dumps({"type": "message", "text": "z" * 70000, "client_id": "huge"}))
    with pytest.raises(ConnectionClosedError) as info:
        await recv_chat_frames(ws, timeout=5)
    # docs/protocol.md promises close code 1009. Plain daphne's autobahn fails such connections
    # "by drop" (no close frame: clients see 1006); the runner makes it send the close frame.
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    assert stored(sqlite_env) == []
    # The server itself is fine.
    other = await ChatClient.open(daphne, cookie)
    assert await other.ping() == []


async def test_rate_limited(
    start_daphne: Callable[..., DaphneServer], rate_limit_env: dict[str, str]
) -> None:
    server = start_daphne(rate_limit_env)
    alice_cookie = await login(server.base_url, "alice")
    alice = await ChatClient.open(server, alice_cookie)
    for n in range(1, 11):
        assert await alice.post(f"m{n}", f"c{n}") == {"type": "ack", "client_id": f"c{n}", "seq": n}
    error = await alice.post("m11", "c11")
    assert error["type"] == "error" and error["code"] == "rate_limited", error
    assert error["client_id"] == "c11"
    assert await alice.ping() == []
    # Socket open; resending an already stored message is still acknowledged.
    assert await alice.post("m1", "c1") == {"type": "ack", "client_id": "c1", "seq": 1}
    # The limit counts all rooms of the user...
    in_secret = await ChatClient.open(server, alice_cookie, room="secret")
    assert (await in_secret.post("elsewhere", "s1"))["code"] == "rate_limited"
    # ...and only that user.
    bob = await ChatClient.open(server, await login(server.base_url, "bob"))
    assert (await bob.post("bob is fine", "b1"))["seq"] == 11
    await alice.wait_seq(11)
    rows = stored(rate_limit_env)
    assert [row[2] for row in rows] == [f"m{n}" for n in range(1, 11)] + ["bob is fine"]
    assert stored(rate_limit_env, "secret") == []


async def test_unavailable_when_database_locked(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    server = start_daphne({**sqlite_env, "SQLITE_TIMEOUT_SECONDS": "0.3"})
    alice = await ChatClient.open(server, await login(server.base_url, "alice"))
    bob = await ChatClient.open(server, await login(server.base_url, "bob"))
    locker = sqlite3.connect(sqlite_env["SQLITE_PATH"], isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        error = await alice.post("while locked", "locked-1")
        assert error["type"] == "error" and error["code"] == "unavailable", error
        assert error["client_id"] == "locked-1"
        assert await alice.ping() == []
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    ack = await alice.post("while locked", "locked-1")
    assert ack == {"type": "ack", "client_id": "locked-1", "seq": 1}
    frame = await bob.wait_for(lambda f: f["type"] == "message")
    assert frame["seq"] == 1 and frame["text"] == "while locked"
    assert stored(sqlite_env) == [(1, "alice", "while locked", "locked-1")]


# --- concurrency -----------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["after=0", ""])
@pytest.mark.parametrize("sending", ["after-hello", "while-connecting"])
async def test_messages_sent_while_history_is_read(
    start_daphne: Callable[..., DaphneServer],
    sqlite_env: dict[str, str],
    query: str,
    sending: str,
) -> None:
    seed_messages(sqlite_env, "lobby", 500)
    # Small batches: the history takes many database round trips, interleaved with the sends.
    server = start_daphne({**sqlite_env, "CHAT_REPLAY_BATCH_SIZE": "7"})
    # Three senders, ten messages each: several sends are queued at any time.
    cookies = [await login(server.base_url, name) for name in ("bob", "carol", "bob")]
    senders = [await ChatClient.open(server, cookie) for cookie in cookies]
    alice_cookie = await login(server.base_url, "alice")
    path = "/ws/chat/lobby/" + (f"?{query}" if query else "")
    readers: list[ChatClient] = []

    async def send_round(n: int) -> None:
        for index, sender in enumerate(senders):
            await sender.send(
                {"type": "message", "text": f"s{index}-{n}", "client_id": f"{index}-{n}"}
            )

    if sending == "while-connecting":
        # Readers join the room and read last_seq while messages are being committed: a
        # message committed in between arrives both live and in the history, and must be
        # delivered once. Each reader is one more chance to hit that window.
        for n in range(10):
            await send_round(n)
            if n % 2:
                readers.append(ChatClient(await ws_connect(server, path, alice_cookie)))
    else:
        readers.append(ChatClient(await ws_connect(server, path, alice_cookie)))
        readers[0].hello = await readers[0].next_frame()
        assert readers[0].hello["last_seq"] == 500
        # The history is still on its way: send now, without waiting for acks.
        for n in range(10):
            await send_round(n)

    acked = []
    for index, sender in enumerate(senders):
        for n in range(10):
            ack = await sender.wait_for(lambda f: f["type"] in ("ack", "error"), timeout=30)
            assert ack["type"] == "ack" and ack["client_id"] == f"{index}-{n}", ack
            acked.append(ack["seq"])
    assert sorted(acked) == list(range(501, 531))
    for reader in readers:
        if not reader.hello:
            reader.hello = await reader.next_frame()
        last_seq = reader.hello["last_seq"]
        assert 500 <= last_seq <= 530
        await reader.wait_seq(530, timeout=30)
        assert await reader.ping() == []
        first = 1 if query else last_seq - 49
        assert reader.seqs() == list(range(first, 531)), f"reader with last_seq {last_seq}"
        texts = {f["seq"]: f["text"] for f in reader.messages()}
        assert sorted(texts[seq] for seq in range(501, 531)) == sorted(
            f"s{index}-{n}" for index in range(3) for n in range(10)
        )
