"""Room replies on real daphne processes, with a real local OpenAI-compatible server.

One daphne (in-memory layer): the reply outlives the requester's socket, a member joining
mid-reply (or the requester reloading) gets the text so far and then the rest, stop stores the
partial text, a failure mid-stream stores it marked as an error.

Two daphnes sharing Redis (pub/sub layer) and one database: members on the other process see
the reply grow, get a snapshot from the owner process when they join mid-reply, and their stop
reaches the owner process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from tests.conftest import base_env, copy_sqlite
from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401
from tests.servers import DaphneServer, RedisServer, login, recv_frames, ws_connect

pytestmark = [pytest.mark.e2e]

KEY = "sk-room-e2e-0b9a8c7d6e5f"
WAIT = 15.0


def room_env(fake: FakeOpenAI, sqlite_path: Path, **extra: str) -> dict[str, str]:
    return base_env(
        SQLITE_PATH=str(sqlite_path),
        OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_MODEL="fake-model",
        CHAT_LLM_MAX_RETRIES="0",
        CHAT_LLM_FIRST_TOKEN_TIMEOUT_SECONDS="3",
        CHAT_LLM_IDLE_TIMEOUT_SECONDS="1",
        CHAT_ASSISTANT_COALESCE_SECONDS="0.02",
        # The module's tests ask far more than 5 times a minute.
        CHAT_ASSISTANT_RATE_LIMIT_REPLIES="1000",
        **extra,
    )


class Member:
    """A room WebSocket that logs every frame (all types), for tests reading at their pace."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.log: list[dict[str, Any]] = []
        self.cursor = 0

    @classmethod
    async def open(cls, server: DaphneServer, cookie: str, query: str = "") -> Member:
        member = cls(await ws_connect(server, "/ws/chat/lobby/" + query, cookie))
        await member.frame("hello")
        return member

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            while self.cursor < len(self.log):
                frame = self.log[self.cursor]
                self.cursor += 1
                if predicate(frame):
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching frame; last frames {self.log[-6:]}")
            with contextlib.suppress(TimeoutError):
                self.log.extend(await recv_frames(self.ws, remaining))

    async def frame(self, frame_type: str, **match: Any) -> dict[str, Any]:
        return await self.wait_for(
            lambda f: f["type"] == frame_type and all(f.get(k) == v for k, v in match.items())
        )

    async def ask(self, text: str = "@assistant tell me everything") -> str:
        """Post a request; return the stream id of the reply it started."""
        await self.ws.send(json.dumps({"type": "message", "text": text}))
        ack = await self.frame("ack")
        return (await self.frame("assistant.start", request_seq=ack["seq"]))["stream_id"]

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    def of_stream(self, stream_id: str) -> list[dict[str, Any]]:
        return [f for f in self.log if f.get("stream_id") == stream_id]

    def message(self, seq: int) -> dict[str, Any]:
        return next(f for f in self.log if f["type"] == "message" and f["seq"] == seq)

    async def close(self) -> None:
        await self.ws.close()


def assemble(frames: list[dict[str, Any]]) -> str:
    """The text a client shows, by the rules of docs/protocol.md (start text, deltas by index)."""
    text, next_index = "", -1
    for frame in frames:
        if frame["type"] == "assistant.start" and frame["next_index"] > next_index:
            text, next_index = frame["text"], frame["next_index"]
        elif frame["type"] == "assistant.delta" and frame["index"] == next_index:
            text += frame["content"]
            next_index += 1
    return text


def stored_rows(path: Path) -> list[tuple[int, str, str, str]]:
    """(seq, username, text, status) of every lobby message, from the database file."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(
            "SELECT m.seq, u.username, m.text, m.status FROM chat_message m "
            "JOIN auth_user u ON u.id = m.user_id JOIN chat_room r ON r.id = m.room_id "
            "WHERE r.slug = 'lobby' ORDER BY m.seq"
        ).fetchall()


def fresh_db(template: Path, folder: Path) -> Path:
    path = folder / "db.sqlite3"
    copy_sqlite(template, path)
    return path


# --- one process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(
    fake_openai_server: FakeOpenAI,  # noqa: F811
    sqlite_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DaphneServer, Path]]:
    path = fresh_db(sqlite_template, tmp_path_factory.mktemp("assistant-room"))
    server = DaphneServer(room_env(fake_openai_server, path)).start()
    yield server, path
    log = server.log_path.read_text(errors="replace")
    server.cleanup()
    assert KEY not in log, "the key reached a log"
    assert "Task was destroyed but it is pending" not in log


async def test_reply_outlives_the_requester_and_is_stored_in_order(
    single: tuple[DaphneServer, Path],
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    server, path = single
    tokens = [f"w{i} " for i in range(30)]
    fake_openai.scenario = Scenario(tokens=tokens, delay=0.03)
    alice = await Member.open(server, await login(server.base_url, "alice"))
    bob = await Member.open(server, await login(server.base_url, "bob"))
    sid = await alice.ask()
    await bob.frame("assistant.delta", stream_id=sid)
    alice.ws.transport.abort()  # the requester's network goes away mid-reply
    end = await bob.frame("assistant.end", stream_id=sid)
    assert end["status"] == "done"
    assert bob.message(end["seq"])["text"] == "".join(tokens)
    assert assemble(bob.of_stream(sid)) == "".join(tokens)
    rows = stored_rows(path)
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), "seq has a gap"
    assert rows[-1][1:] == ("assistant", "".join(tokens), "")
    await bob.close()


async def test_joining_or_reloading_mid_reply_shows_text_so_far_then_the_rest(
    single: tuple[DaphneServer, Path],
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    server, _ = single
    # ~6 s of reply, and both logins before it starts: the joins must land mid-reply even on
    # a loaded 2-core machine (a login hashes a password).
    tokens = [f"t{i} " for i in range(200)]
    fake_openai.scenario = Scenario(tokens=tokens, delay=0.03)
    alice_cookie = await login(server.base_url, "alice")
    carol_cookie = await login(server.base_url, "carol")
    alice = await Member.open(server, alice_cookie)
    sid = await alice.ask()
    for _ in range(5):
        await alice.frame("assistant.delta", stream_id=sid)
    # The requester reloads (a new socket resuming after what it had) and carol joins.
    last = max(f["seq"] for f in alice.log if f["type"] == "message")
    await alice.close()
    reloaded = await Member.open(server, alice_cookie, query=f"?after={last}")
    carol = await Member.open(server, carol_cookie)
    for member in (reloaded, carol):
        snapshot = await member.frame("assistant.start", stream_id=sid)
        assert snapshot["text"] and "".join(tokens).startswith(snapshot["text"])
        assert snapshot["next_index"] >= 5
    for member in (reloaded, carol):
        end = await member.frame("assistant.end", stream_id=sid)
        assert end["status"] == "done"
        assert assemble(member.of_stream(sid)) == "".join(tokens)
        assert member.message(end["seq"])["text"] == "".join(tokens)
        await member.close()


async def test_stop_stores_the_partial_reply_and_drops_the_upstream(
    single: tuple[DaphneServer, Path],
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    server, path = single
    fake_openai.scenario = Scenario(tokens=["word "] * 500, delay=0.02)
    alice = await Member.open(server, await login(server.base_url, "alice"))
    sid = await alice.ask()
    await alice.frame("assistant.delta", stream_id=sid)
    stopped_at = time.monotonic()
    await alice.send({"type": "assistant.stop", "stream_id": sid})
    end = await alice.frame("assistant.end", stream_id=sid)
    assert end["status"] == "stopped"
    message = alice.message(end["seq"])
    assert message["status"] == "stopped"
    assert message["text"] == assemble(alice.of_stream(sid))
    assert await asyncio.to_thread(fake_openai.wait_until, lambda f: bool(f.hangups()), 10)
    (record,) = fake_openai.records()
    assert record.hangup_at is not None and record.hangup_at - stopped_at < 1.0
    assert record.tokens_sent < 500
    assert stored_rows(path)[-1][1:] == ("assistant", message["text"], "stopped")
    await alice.close()


@pytest.mark.parametrize(
    ("scenario", "code"),
    [
        (Scenario(tokens=["Half", " a", " reply", " lost"], reset_after=3), "upstream_unavailable"),
        (Scenario(tokens=["Half", " a", " reply", " lost"], stall_after=3), "upstream_timeout"),
        (
            Scenario(tokens=["Half", " a", " reply", " x"], malformed_after=3),
            "upstream_bad_response",
        ),
    ],
)
async def test_failure_mid_stream_stores_the_partial_reply_as_error(
    single: tuple[DaphneServer, Path],
    fake_openai: FakeOpenAI,  # noqa: F811
    scenario: Scenario,
    code: str,
) -> None:
    server, path = single
    fake_openai.scenario = scenario
    alice = await Member.open(server, await login(server.base_url, "alice"))
    sid = await alice.ask()
    end = await alice.frame("assistant.end", stream_id=sid)
    assert end["status"] == "error" and end["error"]["code"] == code
    assert alice.message(end["seq"])["status"] == "error"
    assert stored_rows(path)[-1][1:] == ("assistant", "Half a reply", "error")
    assert KEY not in json.dumps(alice.log)
    await alice.close()


async def test_upstream_401_ends_with_an_error_and_stores_nothing(
    single: tuple[DaphneServer, Path],
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    server, path = single
    fake_openai.scenario = Scenario(status=401)
    alice = await Member.open(server, await login(server.base_url, "alice"))
    before = len(stored_rows(path))
    sid = await alice.ask()
    end = await alice.frame("assistant.end", stream_id=sid)
    assert end == {
        "type": "assistant.end",
        "stream_id": sid,
        "status": "error",
        "seq": None,
        "error": {"code": "upstream_auth", "message": end["error"]["message"]},
    }
    assert len(stored_rows(path)) == before + 1  # only the request
    assert KEY not in json.dumps(alice.log)
    await alice.close()


# --- two processes sharing Redis ----------------------------------------------------------------


@pytest.fixture
def pair(
    redis_server: RedisServer,
    fake_openai_server: FakeOpenAI,  # noqa: F811
    sqlite_template: Path,
    tmp_path: Path,
) -> Iterator[tuple[DaphneServer, DaphneServer]]:
    path = fresh_db(sqlite_template, tmp_path)
    env = room_env(fake_openai_server, path, REDIS_URL=redis_server.url)
    first = DaphneServer(env).start()
    second = DaphneServer(env).start()
    yield first, second
    for server in (first, second):
        log = server.log_path.read_text(errors="replace")
        server.cleanup()
        assert KEY not in log


@pytest.mark.redis
async def test_other_process_sees_the_reply_joins_mid_reply_and_stops_it(
    pair: tuple[DaphneServer, DaphneServer],
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    owner, other = pair
    tokens = [f"r{i} " for i in range(400)]
    fake_openai.scenario = Scenario(tokens=tokens, delay=0.02)
    alice_cookie = await login(owner.base_url, "alice")
    alice = await Member.open(owner, alice_cookie)
    bob = await Member.open(other, await login(other.base_url, "bob"))
    sid = await alice.ask()
    # bob, on the other process, sees it start and grow.
    await bob.frame("assistant.start", stream_id=sid)
    for _ in range(3):
        await bob.frame("assistant.delta", stream_id=sid)
    # carol joins on the other process mid-reply: the owner answers her snapshot.
    carol = await Member.open(other, await login(other.base_url, "carol"))
    snapshot = await carol.frame("assistant.start", stream_id=sid)
    assert snapshot["text"] and snapshot["next_index"] >= 3
    await carol.frame("assistant.delta", stream_id=sid)
    # bob is not allowed to stop it; the refusal comes back from the owner process.
    await bob.send({"type": "assistant.stop", "stream_id": sid})
    assert (await bob.frame("error"))["code"] == "assistant_forbidden"
    # alice stops it from a tab on the other process: the stop reaches the owner.
    alice_other = await Member.open(other, alice_cookie)
    await alice_other.send({"type": "assistant.stop", "stream_id": sid})
    for member in (alice, bob, carol, alice_other):
        end = await member.frame("assistant.end", stream_id=sid)
        assert end["status"] == "stopped"
    text = alice.message(end["seq"])["text"]
    assert text and "".join(tokens).startswith(text)
    for member in (bob, carol):
        assert member.message(end["seq"])["status"] == "stopped"
        assert assemble(member.of_stream(sid)) == text
    assert await asyncio.to_thread(fake_openai.wait_idle, 10)
    assert fake_openai.records()[0].tokens_sent < 400
    for member in (alice, bob, carol, alice_other):
        await member.close()
