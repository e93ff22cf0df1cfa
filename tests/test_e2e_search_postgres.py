"""PostgreSQL: search with real daphne goes through the full-text index, members only, and
rooms created through the JSON endpoints work there too."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psycopg
import pytest

from chat import search
from tests.servers import ChatClient, DaphneServer, RedisServer, login, seed_messages

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


async def get_json(server: DaphneServer, cookie: str, path: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        return await client.get(path, params=params, headers={"Cookie": cookie})


async def test_full_text_search_members_only(
    start_daphne: Callable[..., DaphneServer], postgres_env: dict[str, str]
) -> None:
    server = start_daphne(postgres_env)
    alice = await login(server.base_url, "alice")
    bob = await login(server.base_url, "bob")
    lobby = await ChatClient.open(server, bob)
    for n, text in enumerate(["Deploying tonight", "the deploy, at last", "nothing here"]):
        assert (await lobby.post(text, f"l{n}"))["type"] == "ack"
    secret = await ChatClient.open(server, alice, room="secret")
    assert (await secret.post("secret deploy plan", "s0"))["type"] == "ack"
    await lobby.close()
    await secret.close()

    # Words, not substrings: "deploy" matches "deploy," but not "Deploying" (no stemming with
    # the "simple" configuration); websearch syntax excludes words with "-".
    body = (await get_json(server, bob, "/chat/lobby/search/", q="DEPLOY")).json()
    assert [(r["seq"], r["url"]) for r in body["results"]] == [(2, "/chat/lobby/#seq-2")]
    body = (await get_json(server, bob, "/chat/lobby/search/", q="deploy -last")).json()
    assert body["results"] == []
    body = (await get_json(server, bob, "/chat/lobby/search/", q='"deploying tonight"')).json()
    assert [r["seq"] for r in body["results"]] == [1]

    # Members only, in one room and across rooms.
    assert (await get_json(server, bob, "/chat/secret/search/", q="deploy")).status_code == 403
    everywhere = (await get_json(server, bob, "/chat/search/", q="deploy")).json()["results"]
    assert [r["room"] for r in everywhere] == ["lobby"]
    everywhere = (await get_json(server, alice, "/chat/search/", q="deploy")).json()["results"]
    assert [r["room"] for r in everywhere] == ["secret", "lobby"]


@pytest.mark.redis
async def test_a_search_loop_is_cut_off_across_processes(
    start_daphne: Callable[..., DaphneServer],
    postgres_env: dict[str, str],
    redis_server: RedisServer,
) -> None:
    # An attacker spreads a search loop over both processes of a site: the budget is the
    # user's, counted in Redis, and other users keep searching.
    env = {
        **postgres_env,
        "REDIS_URL": redis_server.url,
        "CHAT_SEARCH_RATE_LIMIT": "6",
        "CHAT_SEARCH_RATE_LIMIT_WINDOW_SECONDS": "300",
    }
    a, b = start_daphne(env), start_daphne(env)
    mallory = await login(a.base_url, "alice")
    statuses = []
    for n in range(20):
        server = (a, b)[n % 2]
        response = await get_json(server, mallory, "/chat/search/", q=f"deploy {n}")
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(response.headers["Retry-After"]) <= 300
    assert statuses == [200] * 6 + [429] * 14
    bob = await login(b.base_url, "bob")
    assert (await get_json(a, bob, "/chat/search/", q="deploy")).status_code == 200
    assert (await get_json(b, bob, "/chat/lobby/search/", q="deploy")).status_code == 200


def test_the_shipped_query_uses_the_gin_index(postgres_env: dict[str, str]) -> None:
    # A room big enough that reading it is not an option, with the statistics of a grown
    # table: the plan must find the matches through the full-text index, not test each
    # message of the room (or of the table, newest first).
    seed_messages(postgres_env, "lobby", 20_000)
    with psycopg.connect(postgres_env["DATABASE_URL"]) as conn:
        conn.execute("ANALYZE chat_message")
        (lobby,) = conn.execute("SELECT id FROM chat_room WHERE slug = 'lobby'").fetchone() or (0,)
        params = search.SearchParams(q="deploy", before=None, limit=20)
        sql, args = search.fts_page_sql([lobby], params)
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {sql}", args))
    assert "chat_message_text_fts" in plan, plan


async def test_rooms_api_on_postgres(
    start_daphne: Callable[..., DaphneServer], postgres_env: dict[str, str]
) -> None:
    server = start_daphne(postgres_env)
    alice = await login(server.base_url, "alice")
    token = alice.split("csrftoken=")[1]
    headers = {"Cookie": alice, "X-CSRFToken": token, "Origin": server.base_url}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        created = await client.post(
            "/chat/api/rooms/",
            json={"slug": "ops", "title": "Ops", "is_private": True},
            headers=headers,
        )
        assert created.status_code == 201, created.text
        taken = await client.post(
            "/chat/api/rooms/", json={"slug": "ops", "title": "Again"}, headers=headers
        )
        assert taken.json()["error"]["code"] == "slug_taken"
        invited = await client.post(
            "/chat/api/rooms/ops/members/", json={"username": "bob"}, headers=headers
        )
        assert invited.status_code == 201
    bob = await login(server.base_url, "bob")
    rooms = (await get_json(server, bob, "/chat/api/rooms/")).json()["rooms"]
    assert "ops" in [r["slug"] for r in rooms]
