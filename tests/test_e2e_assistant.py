"""The assistant stream endpoint on a real daphne, talking to a real local OpenAI-compatible
server (tests/fake_openai.py, in a thread of this process) through the official client.

Proves: exact passthrough of the text (openai client -> our SSE -> httpx-sse), the upstream
connection dropping within a second of the browser leaving (measured by the fake server),
every failure ending with an error event, bad bodies refused before any upstream call, and
the API key appearing in no response and no line of daphne's log.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import base_env, copy_sqlite
from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401
from tests.servers import DaphneServer, login

pytestmark = [pytest.mark.e2e]

KEY = "sk-e2e-secret-7c1f0e9d8b2a4c6e"
URL = "/chat/assistant/stream/"
QUESTION = [{"role": "user", "content": "Tell me a story"}]
# The functional requirement: the model server sees the hang-up within a second.
HANGUP_BOUND_SECONDS = 1.0


def assistant_env(fake: FakeOpenAI, sqlite_path: Path, **extra: str) -> dict[str, str]:
    env = base_env(
        SQLITE_PATH=str(sqlite_path),
        OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_MODEL="fake-model",
        CHAT_LLM_MAX_RETRIES="0",
        CHAT_LLM_FIRST_TOKEN_TIMEOUT_SECONDS="3",
        CHAT_LLM_IDLE_TIMEOUT_SECONDS="1",
        # Many tests share one user on one server: the panel quotas have their own test.
        CHAT_ASSISTANT_PANEL_MAX_CONCURRENT_PER_USER="100",
        CHAT_ASSISTANT_PANEL_RATE_LIMIT="1000",
    )
    return env | extra


@pytest.fixture(scope="module")
def server(
    fake_openai_server: FakeOpenAI,  # noqa: F811
    sqlite_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DaphneServer]:
    """One daphne for the module (its state is per request), on its own SQLite copy."""
    path = tmp_path_factory.mktemp("assistant-e2e") / "db.sqlite3"
    copy_sqlite(sqlite_template, path)
    daphne = DaphneServer(assistant_env(fake_openai_server, path)).start()
    yield daphne
    assert KEY not in daphne.log_path.read_text(errors="replace"), "the key reached a log"
    daphne.cleanup()


@pytest.fixture
async def http(server: DaphneServer) -> AsyncIterator[httpx.AsyncClient]:
    """A logged-in client (session cookie + CSRF header) of ``server``."""
    cookie = await login(server.base_url, "alice")
    token = cookie.split("csrftoken=")[1]
    headers = {"Cookie": cookie, "X-CSRFToken": token}
    timeout = httpx.Timeout(20, connect=5)
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=timeout) as c:
        yield c


async def read_reply(http: httpx.AsyncClient, body: Any = None) -> tuple[str, list[Any]]:
    """POST, read the whole SSE stream; return the concatenated text and the last event."""
    text: list[str] = []
    async with aconnect_sse(http, "POST", URL, json=body or {"messages": QUESTION}) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for event in source.aiter_sse():
            if event.event == "error":
                return "".join(text), ["error", json.loads(event.data)]
            if event.data == "[DONE]":
                return "".join(text), ["done"]
            text.append(json.loads(event.data)["content"])
    return "".join(text), ["eof"]


async def test_exact_passthrough(http: httpx.AsyncClient, fake_openai: FakeOpenAI) -> None:  # noqa: F811
    tokens = ["Once", " upon", "\n\n", "data: [DONE]", " é", "🙂", ' "quoted"', "\r\n", "end."]
    fake_openai.scenario = Scenario(tokens=tokens, delay=0.005)
    text, end = await read_reply(http)
    assert end == ["done"]
    assert text == "".join(tokens)
    (record,) = fake_openai.records()
    assert record.outcome == "done"
    assert record.messages == QUESTION
    assert record.body["model"] == "fake-model"


async def test_client_disconnect_closes_upstream_within_a_second(
    http: httpx.AsyncClient,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    fake_openai.scenario = Scenario(tokens=["tok "] * 500, delay=0.02)  # 10 s of reply
    async with aconnect_sse(http, "POST", URL, json={"messages": QUESTION}) as source:
        received = 0
        async for _ in source.aiter_sse():
            received += 1
            if received == 5:
                break
        # Leaving the block closes the response half-read: the connection is dropped.
    closed_at = time.monotonic()
    assert await asyncio.to_thread(fake_openai.wait_until, lambda f: bool(f.hangups()), 10)
    (record,) = fake_openai.records()
    assert record.outcome == "client_hangup"
    assert record.hangup_at is not None
    assert record.hangup_at - closed_at < HANGUP_BOUND_SECONDS
    assert record.tokens_sent < 500, "the hang-up came before the stream would have finished"


async def test_disconnect_while_upstream_is_silent_closes_it(
    http: httpx.AsyncClient,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    # The view is waiting for a token when the browser leaves: the cancel lands in that wait.
    fake_openai.scenario = Scenario(tokens=["a", "b", "c"], stall_after=2)
    async with aconnect_sse(http, "POST", URL, json={"messages": QUESTION}) as source:
        received = 0
        async for _ in source.aiter_sse():
            received += 1
            if received == 2:
                break
    closed_at = time.monotonic()
    assert await asyncio.to_thread(fake_openai.wait_until, lambda f: bool(f.hangups()), 10)
    (hangup,) = fake_openai.hangups()
    assert hangup - closed_at < HANGUP_BOUND_SECONDS


async def test_many_streams_abandoned_at_once_leave_nothing_open(
    http: httpx.AsyncClient,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    fake_openai.scenario = Scenario(tokens=["x"] * 300, delay=0.02)

    async def read_some() -> None:
        async with aconnect_sse(http, "POST", URL, json={"messages": QUESTION}) as source:
            async for _ in source.aiter_sse():
                break

    await asyncio.gather(*(read_some() for _ in range(5)))
    assert await asyncio.to_thread(fake_openai.wait_until, lambda f: len(f.hangups()) == 5, 10)
    assert await asyncio.to_thread(fake_openai.wait_idle, 10)


@pytest.mark.parametrize(
    ("scenario", "code", "partial"),
    [
        (Scenario(status=401), "upstream_auth", False),
        (Scenario(status=429), "upstream_rate_limited", False),
        (Scenario(status=500), "upstream_error", False),
        (Scenario(reset_after=2), "upstream_unavailable", True),
        (Scenario(malformed_after=2), "upstream_bad_response", True),
        (Scenario(stall_after=2), "upstream_timeout", True),
        (Scenario(stall_after=0), "upstream_timeout", False),
    ],
)
async def test_upstream_failures_end_with_an_error_event(
    http: httpx.AsyncClient,
    fake_openai: FakeOpenAI,  # noqa: F811
    scenario: Scenario,
    code: str,
    partial: bool,
) -> None:
    fake_openai.scenario = scenario
    started = time.monotonic()
    text, end = await read_reply(http)
    assert end[0] == "error", end
    assert end[1]["code"] == code
    assert end[1]["message"] and KEY not in end[1]["message"]
    assert bool(text) == partial
    assert time.monotonic() - started < 10
    assert await asyncio.to_thread(fake_openai.wait_idle, 10)


@pytest.mark.parametrize(
    ("content", "content_type", "code"),
    [
        (b"{not json", "application/json", "bad_json"),
        (json.dumps({"messages": QUESTION}).encode(), "text/plain", "bad_content_type"),
        (
            json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
            "application/json",
            "bad_request",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": 1}]}).encode(),
            "application/json",
            "bad_request",
        ),
        (json.dumps({"messages": QUESTION * 51}).encode(), "application/json", "too_many_messages"),
        (
            json.dumps({"messages": [{"role": "user", "content": "x" * 8001}]}).encode(),
            "application/json",
            "too_long",
        ),
        (b"x" * (128 * 1024 + 1), "application/json", "too_large"),
    ],
)
async def test_bad_bodies_get_400_without_an_upstream_call(
    http: httpx.AsyncClient,
    fake_openai: FakeOpenAI,  # noqa: F811
    content: bytes,
    content_type: str,
    code: str,
) -> None:
    response = await http.post(URL, content=content, headers={"Content-Type": content_type})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert fake_openai.records() == []


async def test_without_csrf_token_is_refused(server: DaphneServer, fake_openai: FakeOpenAI) -> None:  # noqa: F811
    cookie = await login(server.base_url, "bob")
    async with httpx.AsyncClient(base_url=server.base_url, headers={"Cookie": cookie}) as http:
        response = await http.post(URL, json={"messages": QUESTION})
    assert response.status_code == 403
    assert fake_openai.records() == []


async def test_anonymous_is_refused(server: DaphneServer, fake_openai: FakeOpenAI) -> None:  # noqa: F811
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        response = await http.post(URL, json={"messages": QUESTION})
    assert response.status_code in (401, 403)  # CSRF runs first for a cookieless POST
    assert fake_openai.records() == []


async def test_panel_quota_slot_is_freed_when_the_client_disconnects(
    fake_openai: FakeOpenAI,  # noqa: F811
    start_daphne: Any,
    tmp_path: Path,
    sqlite_template: Path,
) -> None:
    path = tmp_path / "db.sqlite3"
    copy_sqlite(sqlite_template, path)
    env = assistant_env(fake_openai, path, CHAT_ASSISTANT_PANEL_MAX_CONCURRENT_PER_USER="1")
    server = start_daphne(env)
    cookie = await login(server.base_url, "alice")
    headers = {"Cookie": cookie, "X-CSRFToken": cookie.split("csrftoken=")[1]}
    fake_openai.scenario = Scenario(tokens=["tok "] * 500, delay=0.02)
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=20) as http:
        async with aconnect_sse(http, "POST", URL, json={"messages": QUESTION}) as source:
            assert source.response.status_code == 200
            busy = await http.post(URL, json={"messages": QUESTION})
            assert busy.status_code == 429
            assert busy.json()["error"]["code"] == "assistant_busy"
            async for _ in source.aiter_sse():
                break  # read a little, then hang up
        # The abandoned stream's slot comes back: a new stream is accepted.
        fake_openai.scenario = Scenario(tokens=["ok"], delay=0)
        for _ in range(50):
            probe = await http.post(URL, json={"messages": QUESTION})
            if probe.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert probe.status_code == 200, probe.text
        assert "data: [DONE]" in probe.text
