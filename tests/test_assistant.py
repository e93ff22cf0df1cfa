"""Room replies of the assistant in-process: consumers (WebsocketCommunicator), the in-memory
channel layer, the reply registry, and the OpenAI backend against the local fake server.

Every test ends with the registry empty (no task left) and, through the ``fake_openai``
fixture, no upstream stream open.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import override_settings

from chat import protocol
from chat.assistant import protocol as ap
from chat.assistant import replies as assistant
from chat.llm.demo import demo_reply
from chat.models import Message, Room
from chat.routing import websocket_urlpatterns
from realtime_kit import drain as realtime_drain
from realtime_kit.drain import Drain
from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True)]

TIMEOUT = 10
KEY = "sk-room-secret-5e4d3c2b1a09"


# --- helpers -------------------------------------------------------------------------------


class Member:
    """A room socket that logs every frame; ``wait_for`` scans forward from a cursor."""

    def __init__(self, user: User, slug: str = "lobby") -> None:
        self.user = user
        self.comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/chat/{slug}/")
        self.comm.scope["user"] = user
        self.log: list[dict[str, Any]] = []
        self.cursor = 0

    async def connect(self) -> Member:
        ok, _ = await self.comm.connect(timeout=TIMEOUT)
        assert ok
        await self.wait_for(lambda f: f["type"] == "hello")
        return self

    async def _pull(self, timeout: float) -> None:
        data = json.loads(await self.comm.receive_from(timeout=timeout))
        self.log.extend(data if isinstance(data, list) else [data])

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while self.cursor < len(self.log):
                frame = self.log[self.cursor]
                self.cursor += 1
                if predicate(frame):
                    return frame
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching frame; last frames {self.log[-8:]}")
            try:
                await self._pull(remaining)
            except TimeoutError:
                continue

    async def frame(self, frame_type: str, **match: Any) -> dict[str, Any]:
        return await self.wait_for(
            lambda f: f["type"] == frame_type and all(f.get(k) == v for k, v in match.items())
        )

    async def post(self, text: str, client_id: str = "") -> dict[str, Any]:
        await self.send({"type": "message", "text": text, "client_id": client_id or None})
        return await self.wait_for(lambda f: f["type"] == "ack")

    async def send(self, payload: Any) -> None:
        await self.comm.send_to(text_data=json.dumps(payload))

    async def close(self) -> None:
        await self.comm.disconnect()

    def of_stream(self, stream_id: str) -> list[dict[str, Any]]:
        return [f for f in self.log if f.get("stream_id") == stream_id]


def assemble(frames: list[dict[str, Any]]) -> str:
    """The reply text a client shows, by the client rules of docs/protocol.md."""
    text, next_index = "", -1
    for frame in frames:
        if frame["type"] == "assistant.start" and frame["next_index"] > next_index:
            text, next_index = frame["text"], frame["next_index"]
        elif frame["type"] == "assistant.delta" and next_index >= 0:
            assert frame["index"] <= next_index, f"gap before delta {frame['index']}"
            if frame["index"] == next_index:
                text += frame["content"]
                next_index += 1
    return text


@database_sync_to_async
def make_user(name: str, staff: bool = False) -> User:
    # No password: hashing one costs more than most of these tests.
    return User.objects.create(username=name, is_staff=staff)


@database_sync_to_async
def stored(stream_id: str) -> Message | None:
    return Message.objects.select_related("user").filter(client_id=stream_id).first()


@database_sync_to_async
def seed(room: Room, user: User, texts: list[str]) -> None:
    from chat import services

    for text in texts:
        services.post_message(room.pk, user, text, check_rate=False)


@pytest.fixture
async def room() -> Room:
    return await Room.objects.acreate(slug="lobby", title="Lobby")


@pytest.fixture
async def people(room: Room) -> dict[str, User]:
    return {
        "alice": await make_user("alice"),
        "bob": await make_user("bob"),
        "carol": await make_user("carol", staff=True),
    }


@pytest.fixture(autouse=True)
async def empty_registry() -> AsyncIterator[None]:
    assert len(assistant.registry) == 0
    yield
    await asyncio.wait_for(assistant.registry.shutdown(), TIMEOUT)
    assert len(assistant.registry) == 0, "a reply task was left behind"


@pytest.fixture
def llm(fake_openai: FakeOpenAI) -> Iterator[FakeOpenAI]:  # noqa: F811
    """The OpenAI backend on the fake server, with short timeouts and quick coalescing."""
    with override_settings(
        CHAT_ASSISTANT_BACKEND="chat.llm.openai_backend.OpenAIBackend",
        CHAT_LLM_API_KEY=KEY,
        CHAT_LLM_BASE_URL=fake_openai.base_url,
        CHAT_LLM_MAX_RETRIES=0,
        CHAT_LLM_FIRST_TOKEN_TIMEOUT_SECONDS=3,
        CHAT_LLM_IDLE_TIMEOUT_SECONDS=1,
        CHAT_ASSISTANT_COALESCE_SECONDS=0.02,
        CHAT_ASSISTANT_COALESCE_CHARS=64,
        CHAT_RATE_LIMIT_MESSAGES=1000,
    ):
        yield fake_openai


async def ask(member: Member, text: str = "@assistant what is up?") -> dict[str, Any]:
    """Post a request; return the assistant.start frame the requester receives."""
    ack = await member.post(text)
    return await member.frame("assistant.start", request_seq=ack["seq"])


async def ended(member: Member, stream_id: str) -> dict[str, Any]:
    return await member.frame("assistant.end", stream_id=stream_id)


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@assistant hi", True),
        ("@Assistant, what now?", True),
        ("@assistant", True),
        ("@assistant\nmulti-line", True),
        ("hi @assistant", False),
        (" @assistant hi", False),
        ("@assistants unite", False),
        ("@assistant-bot hi", False),
    ],
)
def test_is_request(text: str, expected: bool) -> None:
    assert assistant.is_request(text) is expected


async def test_reply_streams_to_every_member_and_is_stored(
    llm: FakeOpenAI, people: dict[str, User]
) -> None:
    tokens = ["The", " answer", " is", " 42", ".", "\n", "“é🙂”"]
    llm.scenario = Scenario(tokens=tokens, delay=0.01)
    alice = await Member(people["alice"]).connect()
    bob = await Member(people["bob"]).connect()
    start = await ask(alice)
    sid = start["stream_id"]
    assert start["requested_by"] == {"id": people["alice"].pk, "username": "alice"}
    assert start["user"]["username"] == "assistant"
    assert start["text"] == "" and start["next_index"] == 0 and start["demo"] is False
    for member in (alice, bob):
        end = await ended(member, sid)
        assert end["status"] == "done" and end["error"] is None
        message = next(f for f in member.log if f["type"] == "message" and f["seq"] == end["seq"])
        assert message["user"]["username"] == "assistant"
        assert message["client_id"] == sid
        assert message["text"] == "".join(tokens)
        assert "status" not in message
        assert assemble(member.of_stream(sid)) == "".join(tokens)
        # The stored message comes before assistant.end.
        assert member.log.index(message) < member.log.index(end)
    row = await stored(sid)
    assert row is not None and row.status == "" and row.text == "".join(tokens)
    (record,) = llm.records()
    assert record.messages[0]["role"] == "system"
    assert record.messages[-1] == {"role": "user", "content": "alice: @assistant what is up?"}
    await alice.close()
    await bob.close()


async def test_fast_tokens_are_coalesced(llm: FakeOpenAI, people: dict[str, User]) -> None:
    llm.scenario = Scenario(tokens=["x"] * 600)  # as fast as the server can write
    alice = await Member(people["alice"]).connect()
    with override_settings(CHAT_ASSISTANT_COALESCE_SECONDS=0.05, CHAT_ASSISTANT_COALESCE_CHARS=100):
        sid = (await ask(alice))["stream_id"]
        await ended(alice, sid)
    deltas = [f for f in alice.of_stream(sid) if f["type"] == "assistant.delta"]
    assert [d["index"] for d in deltas] == list(range(len(deltas)))
    assert all(len(d["content"]) <= 100 for d in deltas)
    assert len(deltas) < 600 / 10, f"{len(deltas)} frames for 600 tokens"
    assert assemble(alice.of_stream(sid)) == "x" * 600
    await alice.close()


async def test_waiting_text_is_sent_while_the_model_is_silent(
    llm: FakeOpenAI, people: dict[str, User]
) -> None:
    # Two tokens, then nothing: the coalescing timer must send them without a third token.
    llm.scenario = Scenario(tokens=["Hel", "lo", "never"], stall_after=2)
    alice = await Member(people["alice"]).connect()
    with override_settings(CHAT_ASSISTANT_COALESCE_CHARS=1000, CHAT_LLM_IDLE_TIMEOUT_SECONDS=1.5):
        sid = (await ask(alice))["stream_id"]
        delta = await alice.frame("assistant.delta", stream_id=sid)
        assert delta["content"] in ("Hel", "Hello")
        end = await ended(alice, sid)
    assert end["status"] == "error" and end["error"]["code"] == "upstream_timeout"
    await alice.close()


async def test_reply_continues_after_the_requester_leaves(
    llm: FakeOpenAI, people: dict[str, User]
) -> None:
    llm.scenario = Scenario(tokens=[f"w{i} " for i in range(20)], delay=0.03)
    alice = await Member(people["alice"]).connect()
    bob = await Member(people["bob"]).connect()
    sid = (await ask(alice))["stream_id"]
    await alice.close()
    end = await ended(bob, sid)
    assert end["status"] == "done"
    row = await stored(sid)
    assert row is not None and row.text == "".join(f"w{i} " for i in range(20))


async def test_member_joining_mid_reply_gets_text_so_far_then_the_rest(
    llm: FakeOpenAI, people: dict[str, User]
) -> None:
    tokens = [f"t{i} " for i in range(40)]
    llm.scenario = Scenario(tokens=tokens, delay=0.03)
    alice = await Member(people["alice"]).connect()
    sid = (await ask(alice))["stream_id"]
    for _ in range(5):
        await alice.frame("assistant.delta", stream_id=sid)
    bob = await Member(people["bob"]).connect()
    snapshot = await bob.frame("assistant.start", stream_id=sid)
    assert snapshot["text"] and snapshot["next_index"] >= 5
    assert "".join(tokens).startswith(snapshot["text"])
    end = await ended(bob, sid)
    assert end["status"] == "done"
    assert assemble(bob.of_stream(sid)) == "".join(tokens)
    await alice.close()
    await bob.close()


async def test_requester_stops_the_reply(llm: FakeOpenAI, people: dict[str, User]) -> None:
    llm.scenario = Scenario(tokens=["word "] * 200, delay=0.02)
    alice = await Member(people["alice"]).connect()
    bob = await Member(people["bob"]).connect()
    sid = (await ask(alice))["stream_id"]
    await bob.frame("assistant.delta", stream_id=sid)
    await alice.send({"type": "assistant.stop", "stream_id": sid})
    end = await ended(bob, sid)
    assert end["status"] == "stopped" and end["seq"] is not None
    message = next(f for f in bob.log if f["type"] == "message" and f["seq"] == end["seq"])
    assert message["status"] == "stopped"
    assert message["text"] and ("word " * 200).startswith(message["text"])
    assert message["text"] == assemble(bob.of_stream(sid))
    row = await stored(sid)
    assert row is not None and row.status == "stopped"
    # The model server saw its connection drop before the reply was complete.
    assert await asyncio.to_thread(llm.wait_until, lambda f: bool(f.hangups()), 5)
    assert llm.records()[0].tokens_sent < 200
    await alice.close()
    await bob.close()


async def test_only_requester_or_staff_may_stop(llm: FakeOpenAI, people: dict[str, User]) -> None:
    llm.scenario = Scenario(tokens=["w "] * 300, delay=0.02)
    alice = await Member(people["alice"]).connect()
    bob = await Member(people["bob"]).connect()
    carol = await Member(people["carol"]).connect()  # staff
    sid = (await ask(alice))["stream_id"]
    await bob.send({"type": "assistant.stop", "stream_id": sid})
    error = await bob.frame("error")
    assert error["code"] == ap.ASSISTANT_FORBIDDEN
    await bob.frame("assistant.delta", stream_id=sid)  # still running
    await carol.send({"type": "assistant.stop", "stream_id": sid})
    end = await ended(alice, sid)
    assert end["status"] == "stopped"
    for member in (alice, bob, carol):
        await member.close()


async def test_bad_stop_frames(llm: FakeOpenAI, people: dict[str, User]) -> None:
    alice = await Member(people["alice"]).connect()
    for stream_id in [None, 5, "", "x" * 65, "a.b", "a b"]:
        await alice.send({"type": "assistant.stop", "stream_id": stream_id})
        assert (await alice.frame("error"))["code"] == "bad_frame"
    # Stopping a reply that does not (or no longer) exist is silently ignored.
    await alice.send({"type": "assistant.stop", "stream_id": "asst-unknown"})
    await alice.send({"type": "ping"})
    assert (await alice.wait_for(lambda f: f["type"] in ("pong", "error")))["type"] == "pong"
    await alice.close()


async def test_one_running_reply_per_user(llm: FakeOpenAI, people: dict[str, User]) -> None:
    llm.scenario = Scenario(tokens=["w "] * 50, delay=0.02)
    alice = await Member(people["alice"]).connect()
    other_tab = await Member(people["alice"]).connect()
    sid = (await ask(alice))["stream_id"]
    await other_tab.post("@assistant and another thing")
    error = await other_tab.frame("error")
    assert error["code"] == ap.ASSISTANT_BUSY
    # Another user is not affected.
    bob = await Member(people["bob"]).connect()
    bob_sid = (await ask(bob))["stream_id"]
    await ended(alice, sid)
    await ended(alice, bob_sid)
    assert len(llm.records()) == 2
    for member in (alice, other_tab, bob):
        await member.close()


async def test_requests_are_rate_limited(llm: FakeOpenAI, people: dict[str, User]) -> None:
    llm.scenario = Scenario(tokens=["ok"])
    alice = await Member(people["alice"]).connect()
    with override_settings(CHAT_ASSISTANT_RATE_LIMIT_REPLIES=2):
        for _ in range(2):
            await ended(alice, (await ask(alice))["stream_id"])
        await alice.post("@assistant once more")
        error = await alice.frame("error")
    assert error["code"] == "rate_limited"
    assert len(llm.records()) == 2
    await alice.close()


@pytest.mark.parametrize(
    "spelling",
    [
        "@a\u017f\u017fi\u017ftant",  # LONG S: case-folds to s
        "@ASS\u0130STANT",  # CAPITAL I WITH DOT ABOVE: case-folds to i
    ],
)
async def test_unicode_spellings_of_a_request_count_against_the_limit(
    llm: FakeOpenAI, people: dict[str, User], spelling: str
) -> None:
    # Whatever is_request() calls a request (it folds case the Unicode way) must be counted
    # by the same rule: SQLite's LIKE folds ASCII only, so these once bypassed the limit.
    assert assistant.is_request(f"{spelling} hi")
    llm.scenario = Scenario(tokens=["ok"])
    alice = await Member(people["alice"]).connect()
    with override_settings(CHAT_ASSISTANT_RATE_LIMIT_REPLIES=2):
        for n in range(2):
            await ended(alice, (await ask(alice, f"{spelling} question {n}"))["stream_id"])
        await alice.post(f"{spelling} once more")
        error = await alice.frame("error")
    assert error["code"] == "rate_limited"
    assert len(llm.records()) == 2
    await alice.close()


async def test_resent_request_does_not_ask_twice(llm: FakeOpenAI, people: dict[str, User]) -> None:
    llm.scenario = Scenario(tokens=["once"])
    alice = await Member(people["alice"]).connect()
    first = await alice.post("@assistant hi", client_id="c-1")
    await ended(alice, (await alice.frame("assistant.start"))["stream_id"])
    again = await alice.post("@assistant hi", client_id="c-1")
    assert again["seq"] == first["seq"]
    await alice.send({"type": "ping"})
    await alice.frame("pong")
    assert len(llm.records()) == 1
    await alice.close()


async def test_context_is_recent_history_bounded(
    llm: FakeOpenAI, people: dict[str, User], room: Room
) -> None:
    llm.scenario = Scenario(tokens=["ok"])
    await seed(room, people["bob"], [f"old message {i}" for i in range(30)])
    alice = await Member(people["alice"]).connect()
    with override_settings(CHAT_ASSISTANT_CONTEXT_MESSAGES=5, CHAT_ASSISTANT_CONTEXT_CHARS=10_000):
        await ended(alice, (await ask(alice, "@assistant summarise"))["stream_id"])
    messages = llm.records()[0].messages
    assert [m["content"] for m in messages[1:]] == [
        "bob: old message 26",
        "bob: old message 27",
        "bob: old message 28",
        "bob: old message 29",
        "alice: @assistant summarise",
    ]
    # The assistant's earlier replies are its own turns.
    with override_settings(CHAT_ASSISTANT_CONTEXT_MESSAGES=3, CHAT_ASSISTANT_CONTEXT_CHARS=50):
        await ended(alice, (await ask(alice, "@assistant again"))["stream_id"])
    messages = llm.records()[1].messages
    assert messages[1:] == [
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "alice: @assistant again"},
    ]
    await alice.close()


FAILURES = [
    pytest.param(Scenario(status=401), "upstream_auth", False, id="401"),
    pytest.param(Scenario(status=429), "upstream_rate_limited", False, id="429"),
    pytest.param(Scenario(status=500), "upstream_error", False, id="500"),
    pytest.param(Scenario(reset_after=3, delay=0.01), "upstream_unavailable", True, id="reset"),
    pytest.param(Scenario(malformed_after=3), "upstream_bad_response", True, id="malformed"),
    pytest.param(Scenario(stall_after=3), "upstream_timeout", True, id="stall"),
]


@pytest.mark.parametrize(("scenario", "code", "partial"), FAILURES)
async def test_failures_end_the_reply_and_store_the_partial_text(
    llm: FakeOpenAI,
    people: dict[str, User],
    scenario: Scenario,
    code: str,
    partial: bool,
) -> None:
    scenario.tokens = ["Part", "ial", " reply", " never", " finished"]
    llm.scenario = scenario
    alice = await Member(people["alice"]).connect()
    sid = (await ask(alice))["stream_id"]
    end = await ended(alice, sid)
    assert end["status"] == "error"
    assert end["error"]["code"] == code and end["error"]["message"]
    row = await stored(sid)
    if partial:
        assert end["seq"] is not None
        assert row is not None and row.status == "error" and row.text == "Partial reply"
        message = next(f for f in alice.log if f["type"] == "message" and f["seq"] == end["seq"])
        assert message["status"] == "error"
    else:
        assert end["seq"] is None and row is None
    assert KEY not in json.dumps(alice.log)
    assert await asyncio.to_thread(llm.wait_idle, 5)
    await alice.close()


async def test_overlong_reply_is_cut(llm: FakeOpenAI, people: dict[str, User]) -> None:
    llm.scenario = Scenario(tokens=["abcd"] * 50)
    alice = await Member(people["alice"]).connect()
    with override_settings(CHAT_ASSISTANT_MAX_REPLY_CHARS=10):
        end = await ended(alice, (await ask(alice))["stream_id"])
    assert end["status"] == "error" and end["error"]["code"] == ap.REPLY_TOO_LONG
    message = next(f for f in alice.log if f["type"] == "message" and f["seq"] == end["seq"])
    assert message["text"] == "abcdabcdab"
    await alice.close()


async def test_demo_backend_reply(people: dict[str, User]) -> None:
    alice = await Member(people["alice"]).connect()
    with override_settings(
        CHAT_ASSISTANT_BACKEND="chat.llm.demo.DemoBackend", CHAT_ASSISTANT_DEMO_DELAY_SECONDS=0
    ):
        start = await ask(alice, "@assistant hello there")
        assert start["demo"] is True
        end = await ended(alice, start["stream_id"])
    message = next(f for f in alice.log if f["type"] == "message" and f["seq"] == end["seq"])
    context = [{"role": "user", "content": "alice: @assistant hello there"}]
    assert message["text"] == demo_reply(context)  # type: ignore[arg-type]
    await alice.close()


async def test_shutdown_stores_partial_replies_as_stopped(
    llm: FakeOpenAI, people: dict[str, User]
) -> None:
    llm.scenario = Scenario(tokens=["w "] * 300, delay=0.02)
    alice = await Member(people["alice"]).connect()
    sid = (await ask(alice))["stream_id"]
    await alice.frame("assistant.delta", stream_id=sid)
    await assistant.registry.shutdown()
    assert len(assistant.registry) == 0
    end = await ended(alice, sid)
    assert end["status"] == "stopped"
    row = await stored(sid)
    assert row is not None and row.status == "stopped"
    await alice.close()


async def test_no_reply_starts_while_the_process_drains(
    llm: FakeOpenAI, people: dict[str, User], monkeypatch: pytest.MonkeyPatch
) -> None:
    # It would be interrupted at once, after the drain's callbacks ran: refused instead.
    restarting = Drain()
    await restarting.begin()
    monkeypatch.setattr(realtime_drain, "_drain", restarting)
    alice = await Member(people["alice"]).connect()
    await alice.post("@assistant are you there?")
    error = await alice.frame("error")
    assert error["code"] == "unavailable" and "restarting" in error["message"]
    assert len(assistant.registry) == 0
    assert llm.records() == []
    await alice.close()


async def test_a_reply_of_control_characters_is_cut_at_the_encoded_byte_bound(
    llm: FakeOpenAI, people: dict[str, User]
) -> None:
    # 30,000 characters, 180 KB once escaped: under the old character limit (16,000) it was
    # stored as a 96 KB frame, over daphne's 64 KiB, and every member's socket closed 1011.
    llm.scenario = Scenario(tokens=["\u0001" * 100] * 300)
    alice = await Member(people["alice"]).connect()
    sid = (await ask(alice))["stream_id"]
    end = await ended(alice, sid)
    assert end["status"] == "error" and end["error"]["code"] == "reply_too_long", end
    stored = await Message.objects.aget(seq=end["seq"])
    assert protocol.encoded_text_bytes(stored.text) <= 16 * 1024
    assert stored.text and set(stored.text) == {"\u0001"}
    await alice.close()
    # A member joining later gets it in history, within one server message of 64 KiB.
    late = Member(people["bob"])
    ok, _ = await late.comm.connect(timeout=TIMEOUT)
    assert ok
    sizes = []
    while True:
        raw = await late.comm.receive_from(timeout=TIMEOUT)
        sizes.append(len(raw.encode("utf-8")))
        frames = json.loads(raw)
        frames = frames if isinstance(frames, list) else [frames]
        if any(f["type"] == "message" and f.get("seq") == end["seq"] for f in frames):
            break
    assert max(sizes) <= 65536
    await late.comm.disconnect()
