"""No database connection is held while the assistant streams, on SQLite and PostgreSQL.

A long reply (the model server stalls mid-stream) must not pin a database connection: the
stream endpoint releases the request's connection after authentication, and the room runner
only touches the database through ``database_sync_to_async``, which closes the thread's
connection after each call. Counted from outside the daphne: PostgreSQL backends of the test
database (``pg_stat_activity``), or the daphne's open file handles on the SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401
from tests.servers import DaphneServer, db_connections, login, recv_frames, ws_connect

pytestmark = [pytest.mark.e2e]

KEY = "sk-db-test-1f2e3d4c5b6a"


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, fake_openai: FakeOpenAI) -> dict[str, str]:  # noqa: F811
    base: dict[str, str] = request.getfixturevalue(f"{request.param}_env")
    return {
        **base,
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": fake_openai.base_url,
        "CHAT_LLM_MAX_RETRIES": "0",
        "CHAT_LLM_IDLE_TIMEOUT_SECONDS": "30",
    }


async def test_streams_hold_no_database_connection(
    env: dict[str, str],
    start_daphne: Callable[..., DaphneServer],
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    server = start_daphne(env)
    cookie = await login(server.base_url, "alice")
    fake_openai.scenario = Scenario(tokens=["a", "b", "c", "d"], stall_after=2)

    # The private endpoint: a stream that stalls after two tokens.
    headers = {"Cookie": cookie, "X-CSRFToken": cookie.split("csrftoken=")[1]}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30) as http:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        async with aconnect_sse(http, "POST", "/chat/assistant/stream/", json=body) as source:
            events = 0
            async for _ in source.aiter_sse():
                events += 1
                if events == 2:
                    break
            assert await eventually(lambda: db_connections(server, env) == 0), (
                f"{db_connections(server, env)} connections held while the endpoint streams"
            )

    # A room reply that stalls: the runner holds no connection between its queries.
    fake_openai.reset(Scenario(tokens=["a", "b", "c", "d"], stall_after=2))
    ws = await ws_connect(server, "/ws/chat/lobby/", cookie)
    await ws.send(json.dumps({"type": "message", "text": "@assistant hi"}))
    deltas = 0
    stream_id = None
    while deltas < 1:
        for frame in await recv_frames(ws, 10):
            if frame["type"] == "assistant.delta":
                deltas += 1
                stream_id = frame["stream_id"]
    assert await eventually(lambda: db_connections(server, env) == 0), (
        f"{db_connections(server, env)} connections held while a room reply streams"
    )
    await ws.send(json.dumps({"type": "assistant.stop", "stream_id": stream_id}))
    while True:
        frames = await recv_frames(ws, 10)
        if any(f["type"] == "assistant.end" for f in frames):
            break
    await ws.close()
    assert await eventually(lambda: db_connections(server, env) == 0)
    assert await asyncio.to_thread(fake_openai.wait_idle, 10)
