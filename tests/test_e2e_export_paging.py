"""End to end: ``GET /chat/<slug>/messages/?before=&limit=`` (history paging) against daphne."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import servers
from tests.conftest import base_env, copy_sqlite
from tests.servers import DaphneServer
from tests.test_e2e_export import client, post_messages, seed, websocket_history

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EMPTY = {"messages": [], "has_more": False, "next_before": None}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return dict(request.getfixturevalue(f"{request.param}_env"))


async def page(http: httpx.AsyncClient, room: str = "lobby", **query: Any) -> dict[str, Any]:
    response = await http.get(f"/chat/{room}/messages/", params=query)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"messages", "has_more", "next_before"}, body
    return dict(body)


def seqs(body: dict[str, Any]) -> list[int]:
    return [m["seq"] for m in body["messages"]]


async def test_pages_walk_back_to_the_first_message(
    db_env: dict[str, str], start_daphne: Callable[..., DaphneServer]
) -> None:
    seed(db_env, "lobby", 19)
    server = start_daphne(db_env)
    alice = await servers.login(server.base_url, "alice")
    await post_messages(server, alice, "lobby", [("twentieth, with ünïcode", "c20")])
    await post_messages(server, alice, "lobby", [("=21", "")])
    frames = await websocket_history(server, alice, "lobby")
    assert len(frames) == 21
    async with client(server, alice) as http:
        latest = await page(http, limit=7)
        assert (seqs(latest), latest["has_more"], latest["next_before"]) == (
            list(range(15, 22)),
            True,
            15,
        )
        # The messages are the WebSocket's message frames, field for field.
        assert latest["messages"] == frames[14:]
        middle = await page(http, before=latest["next_before"], limit=7)
        assert (seqs(middle), middle["has_more"], middle["next_before"]) == (
            list(range(8, 15)),
            True,
            8,
        )
        # The last page is exactly full: nothing older, so no next_before.
        first = await page(http, before=middle["next_before"], limit=7)
        assert (seqs(first), first["has_more"], first["next_before"]) == (
            list(range(1, 8)),
            False,
            None,
        )
        assert first["messages"] == frames[:7]

        # Without a limit: CHAT_HISTORY_PAGE_SIZE (50), more than there is.
        everything = await page(http)
        assert everything["messages"] == frames
        assert (everything["has_more"], everything["next_before"]) == (False, None)

        # Edges: before the first message, a before past the end, one message per page.
        assert await page(http, before=1) == {
            "messages": [],
            "has_more": False,
            "next_before": None,
        }
        assert seqs(await page(http, before=2)) == [1]
        assert (await page(http, before=10**15, limit=3))["messages"] == frames[-3:]
        one = await page(http, before=21, limit=1)
        assert (seqs(one), one["has_more"], one["next_before"]) == ([20], True, 20)
        assert one["messages"][0]["text"] == "twentieth, with ünïcode"
        assert one["messages"][0]["client_id"] == "c20"


async def test_limit_is_capped(daphne: DaphneServer, sqlite_env: dict[str, str]) -> None:
    seed(sqlite_env, "lobby", 130)
    alice = await servers.login(daphne.base_url, "alice")
    async with client(daphne, alice) as http:
        body = await page(http, limit=1000)
        # CHAT_HISTORY_PAGE_MAX (100): the newest 100, and the rest is still reachable.
        assert seqs(body) == list(range(31, 131))
        assert (body["has_more"], body["next_before"]) == (True, 31)
        assert seqs(await page(http, before=31, limit=1000)) == list(range(1, 31))


async def test_an_empty_room(daphne: DaphneServer) -> None:
    alice = await servers.login(daphne.base_url, "alice")
    async with client(daphne, alice) as http:
        assert await page(http) == EMPTY
        assert await page(http, room="secret", before=5) == EMPTY


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=",
        "limit=2.5",
        "limit=%2B5",  # "+5"
        "before=0",
        "before=-1",
        "before=x",
        "before=",
        "before=1e3",
        "before=99999999999999999999999",  # beyond a bigint
        "before=5&limit=0",
    ],
)
async def test_bad_parameters_are_400_with_a_json_error(
    daphne_with_login: tuple[DaphneServer, str], query: str
) -> None:
    server, cookie = daphne_with_login
    async with client(server, cookie) as http:
        response = await http.get(f"/chat/lobby/messages/?{query}")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "bad_request"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.fixture(scope="module")
def daphne_with_login(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
) -> Iterator[tuple[DaphneServer, str]]:
    """One daphne for the parameter cases (they only read)."""
    path = tmp_path_factory.mktemp("paging-params") / "chat.sqlite3"
    copy_sqlite(sqlite_template, path)
    server = DaphneServer(base_env(SQLITE_PATH=str(path))).start()
    try:
        cookie = asyncio.run(servers.login(server.base_url, "alice"))
        yield server, cookie
    finally:
        server.cleanup()


async def test_access_control(daphne: DaphneServer) -> None:
    bob = await servers.login(daphne.base_url, "bob")  # not a member of secret
    async with client(daphne) as anonymous:
        response = await anonymous.get("/chat/lobby/messages/")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
    async with client(daphne, bob) as http:
        response = await http.get("/chat/secret/messages/")
        assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
        response = await http.get("/chat/nowhere/messages/")
        assert (response.status_code, response.json()["error"]["code"]) == (404, "not_found")
        # Access is checked before parameters: a stranger learns nothing from a 400.
        response = await http.get("/chat/secret/messages/?limit=0")
        assert response.status_code == 403
        assert (await http.post("/chat/lobby/messages/")).status_code in (403, 405)
