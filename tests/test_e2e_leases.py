"""Per-user limits across two daphne processes sharing one Redis (``REDIS_URL``) and one
database: notification streams, assistant panel streams (open and per window) and running
room replies are counted for the user, not once per process. A SIGKILLed process's places
come back after the lease TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from notifications.testing import open_stream
from tests.servers import DaphneServer, RedisServer, login, recv_until, ws_connect

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

STREAM = "/notifications/stream/"
PANEL = "/chat/assistant/stream/"
QUESTION = {"messages": [{"role": "user", "content": "Tell me a long story"}]}
WAIT = 15.0  # seconds; generous for a loaded 2-core machine
LEASE_TTL_SECONDS = "2"


@pytest.fixture
def redis_env(sqlite_env: dict[str, str], redis_server: RedisServer) -> dict[str, str]:
    return {**sqlite_env, "REDIS_URL": redis_server.url}


@contextlib.asynccontextmanager
async def clients(*servers: DaphneServer) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One logged-in client of alice per server (one session, valid on every process)."""
    cookie = await login(servers[0].base_url, "alice")
    csrf = cookie.split("csrftoken=")[1].split(";")[0]
    headers = {"Cookie": cookie, "X-CSRFToken": csrf}
    timeout = httpx.Timeout(10.0, read=60.0)
    async with contextlib.AsyncExitStack() as stack:
        made = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=s.base_url, headers=headers, timeout=timeout)
            )
            for s in servers
        ]
        yield made


async def try_stream(client: httpx.AsyncClient, method: str, path: str) -> httpx.Response:
    """Open a stream and hang up at once; the response (with its body unless it was a 200)."""
    body = QUESTION if method == "POST" else None
    async with client.stream(method, path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
        return response


async def eventually_admitted(client: httpx.AsyncClient, method: str, path: str) -> None:
    """Retry until the server admits a stream (places come back after a release or a TTL)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        response = await try_stream(client, method, path)
        if response.status_code == 200:
            return
        assert response.status_code == 429, response.text
        assert loop.time() < deadline, f"still refused after {WAIT:g} s: {response.text}"
        await asyncio.sleep(0.2)


def assert_too_many_streams(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 429, response.status_code
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert (error["code"], error["limit"]) == ("too_many_streams", limit)


# --- notification streams ---------------------------------------------------------------------


async def test_notification_stream_cap_holds_across_two_processes(
    start_daphne: Callable[..., DaphneServer], redis_env: dict[str, str]
) -> None:
    env = {**redis_env, "NOTIFICATIONS_MAX_STREAMS_PER_USER": "4"}
    a, b = start_daphne(env), start_daphne(env)
    async with clients(a, b) as (on_a, on_b), contextlib.AsyncExitStack() as stack:
        streams = []
        for client in (on_a, on_b, on_a, on_b):
            stream = await stack.enter_async_context(open_stream(client, STREAM))
            await stream.unread()
            streams.append(stream)
        # Two open on each process: the fifth is refused on either.
        assert_too_many_streams(await try_stream(on_a, "GET", STREAM), 4)
        assert_too_many_streams(await try_stream(on_b, "GET", STREAM), 4)
        # Closing one on A frees a place on B.
        await streams[0].close()
        await eventually_admitted(on_b, "GET", STREAM)


async def test_a_killed_process_stops_counting_after_the_lease_ttl(
    start_daphne: Callable[..., DaphneServer], redis_env: dict[str, str]
) -> None:
    env = {
        **redis_env,
        "NOTIFICATIONS_MAX_STREAMS_PER_USER": "3",
        "NOTIFICATIONS_LEASE_TTL_SECONDS": LEASE_TTL_SECONDS,
    }
    a, b = start_daphne(env), start_daphne(env)
    async with clients(a, b) as (on_a, on_b), contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            stream = await stack.enter_async_context(open_stream(on_a, STREAM))
            await stream.unread()
        assert_too_many_streams(await try_stream(on_b, "GET", STREAM), 3)
        a.kill()  # SIGKILL: nothing is released, nobody refreshes A's leases any more
        await eventually_admitted(on_b, "GET", STREAM)
        stack.pop_all()  # A's streams died with it


# --- the assistant panel ----------------------------------------------------------------------


async def test_panel_concurrency_holds_across_two_processes(
    start_daphne: Callable[..., DaphneServer], redis_env: dict[str, str]
) -> None:
    env = {
        **redis_env,
        "CHAT_ASSISTANT_PANEL_MAX_CONCURRENT_PER_USER": "1",
        "CHAT_ASSISTANT_DEMO_DELAY_SECONDS": "0.5",  # the demo reply lasts about a minute
    }
    a, b = start_daphne(env), start_daphne(env)
    async with clients(a, b) as (on_a, on_b):
        async with on_a.stream("POST", PANEL, json=QUESTION) as running:
            assert running.status_code == 200
            # Kept referenced: a collected iterator closes the response (a hang-up).
            lines = running.aiter_lines()
            assert await anext(lines) == ": stream"
            busy = await try_stream(on_b, "POST", PANEL)
            assert busy.status_code == 429
            assert busy.json()["error"]["code"] == "assistant_busy"
            assert int(busy.headers["retry-after"]) >= 1
        # A's stream is gone: B admits one.
        await eventually_admitted(on_b, "POST", PANEL)


async def test_panel_rate_limit_holds_across_two_processes(
    start_daphne: Callable[..., DaphneServer], redis_env: dict[str, str]
) -> None:
    env = {
        **redis_env,
        "CHAT_ASSISTANT_PANEL_RATE_LIMIT": "2",
        "CHAT_ASSISTANT_PANEL_RATE_LIMIT_WINDOW_SECONDS": "300",
        "CHAT_ASSISTANT_DEMO_DELAY_SECONDS": "0",
    }
    a, b = start_daphne(env), start_daphne(env)
    async with clients(a, b) as (on_a, on_b):
        for client in (on_a, on_b):
            response = await client.post(PANEL, json=QUESTION)
            assert response.status_code == 200
            assert "data: [DONE]" in response.text
        for client in (on_a, on_b):
            limited = await client.post(PANEL, json=QUESTION)
            assert limited.status_code == 429
            assert limited.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(limited.headers["retry-after"]) <= 300


# --- room replies -----------------------------------------------------------------------------


async def ask(ws: ClientConnection, text: str) -> dict[str, Any]:
    """Post a request; return the frame answering it: its reply's start, or an error."""
    await ws.send(json.dumps({"type": "message", "text": text}))
    # The server batches frames: the answer may come in the same message as the ack.
    frames = await recv_until(ws, lambda f: f["type"] == "ack", WAIT)
    at = max(i for i, f in enumerate(frames) if f["type"] == "ack")
    ack, after = frames[at], frames[at + 1 :]

    def answers(frame: dict[str, Any]) -> bool:
        # Other replies of the room (from either process) may start meanwhile; errors are ours.
        if frame["type"] == "assistant.start":
            return bool(frame["request_seq"] == ack["seq"])
        return bool(frame["type"] == "error")

    if not any(answers(f) for f in after):
        after = await recv_until(ws, answers, WAIT)
    return next(f for f in after if answers(f))


async def test_running_room_replies_are_capped_across_two_processes(
    start_daphne: Callable[..., DaphneServer], redis_env: dict[str, str]
) -> None:
    env = {
        **redis_env,
        "CHAT_ASSISTANT_MAX_CONCURRENT_PER_USER": "1",
        "CHAT_ASSISTANT_RATE_LIMIT_REPLIES": "1000",
        "CHAT_ASSISTANT_DEMO_DELAY_SECONDS": "0.5",
    }
    a, b = start_daphne(env), start_daphne(env)
    cookie = await login(a.base_url, "alice")
    on_a = await ws_connect(a, "/ws/chat/lobby/", cookie)
    on_b = await ws_connect(b, "/ws/chat/lobby/", cookie)
    try:
        for ws in (on_a, on_b):
            await recv_until(ws, lambda f: f["type"] == "hello", WAIT)
        started = await ask(on_a, "@assistant tell me everything")
        assert started["type"] == "assistant.start", started
        refused = await ask(on_b, "@assistant and from the other process")
        assert (refused["type"], refused["code"]) == ("error", "assistant_busy"), refused
        # Once the first reply has ended, the other process starts one.
        await on_a.send(json.dumps({"type": "assistant.stop", "stream_id": started["stream_id"]}))
        await recv_until(
            on_b,
            lambda f: f["type"] == "assistant.end" and f["stream_id"] == started["stream_id"],
            WAIT,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while (answer := await ask(on_b, "@assistant now?"))["type"] != "assistant.start":
            assert answer["code"] == "assistant_busy" and loop.time() < deadline, answer
            await asyncio.sleep(0.2)
        await on_b.send(json.dumps({"type": "assistant.stop", "stream_id": answer["stream_id"]}))
    finally:
        await on_a.close()
        await on_b.close()
