"""Access is re-checked on open sockets: removal, deactivation and logout close them live."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.servers import (
    ChatClient,
    DaphneServer,
    RedisServer,
    create_superuser,
    login,
    run_django_script,
    ws_connect,
)

pytestmark = [pytest.mark.e2e]

# Revocation must reach open sockets within 1 s; the tests allow for a loaded machine.
REVOKE_TIMEOUT_SECONDS = 3.0

_MEMBERSHIP_SCRIPT = textwrap.dedent(
    """
    import django, json
    django.setup()
    from chat.models import Membership
    membership = Membership.objects.get(room__slug="secret", user__username="alice")
    print(json.dumps({"membership": membership.pk}))
    """
)

_CHANGE_SCRIPT = textwrap.dedent(
    """
    import django, sys
    django.setup()
    from django.contrib.auth import get_user_model
    from chat.models import Membership
    what = sys.argv[1]
    if what == "deactivate":
        user = get_user_model().objects.get(username="alice")
        user.is_active = False
        user.save()
    elif what == "remove":
        Membership.objects.get(room__slug="secret", user__username="alice").delete()
    """
)


async def close_code(ws: ClientConnection, timeout: float = REVOKE_TIMEOUT_SECONDS) -> int | None:
    """Read until the server closes; return its close code (None: no close frame)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), max(deadline - loop.time(), 0.001))
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def still_open(client: ChatClient) -> bool:
    """True once the socket answered a ping (ChatClient.ping fails otherwise)."""
    await client.ping()
    return True


async def test_removing_a_member_in_the_admin_closes_their_socket(
    daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    create_superuser(sqlite_env, "root", "root-pw-1")
    ids = json.loads(run_django_script(_MEMBERSHIP_SCRIPT, sqlite_env))
    cookie = await login(daphne.base_url, "alice")
    secret = await ws_connect(daphne, "/ws/chat/secret/", cookie)
    lobby = await ChatClient.open(daphne, cookie)
    async with httpx.AsyncClient(base_url=daphne.base_url, timeout=10) as admin:
        admin.headers["Cookie"] = await login(daphne.base_url, "root", "root-pw-1")
        url = f"/admin/chat/membership/{ids['membership']}/delete/"
        page = await admin.get(url)
        assert page.status_code == 200, page.status_code
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token is not None
        done = await admin.post(url, data={"csrfmiddlewaretoken": token[1], "post": "yes"})
        assert done.status_code == 302, done.text[:300]
    # Closed with "forbidden" (clients do not reconnect); the public room stays open.
    assert await close_code(secret) == 4403
    assert await still_open(lobby)
    await lobby.close()


async def test_logout_closes_that_sessions_sockets_only(daphne: DaphneServer) -> None:
    first = await login(daphne.base_url, "alice")
    second = await login(daphne.base_url, "alice")
    leaving = await ws_connect(daphne, "/ws/chat/lobby/", first)
    staying = await ChatClient.open(daphne, second)
    csrf = re.search(r"csrftoken=([^;]+)", first)
    assert csrf is not None
    async with httpx.AsyncClient(base_url=daphne.base_url, timeout=10) as client:
        client.headers["Cookie"] = first
        response = await client.post(
            "/accounts/logout/",
            headers={"X-CSRFToken": csrf[1], "Referer": daphne.base_url + "/"},
        )
        assert response.status_code in (200, 302), response.status_code
    assert await close_code(leaving) == 4401
    assert await still_open(staying)
    await staying.close()


@pytest.fixture
def redis_env(sqlite_env: dict[str, str], redis_server: RedisServer) -> dict[str, str]:
    return {**sqlite_env, "REDIS_URL": redis_server.url}


@pytest.fixture
def redis_pair(
    start_daphne: Callable[..., DaphneServer], redis_env: dict[str, str]
) -> tuple[DaphneServer, DaphneServer]:
    return start_daphne(redis_env), start_daphne(redis_env)


@pytest.mark.redis
async def test_deactivation_closes_sockets_in_every_process(
    redis_pair: tuple[DaphneServer, DaphneServer], redis_env: dict[str, str]
) -> None:
    a, b = redis_pair
    alice_cookie = await login(a.base_url, "alice")
    sockets = [await ws_connect(server, "/ws/chat/lobby/", alice_cookie) for server in (a, b)]
    bob = await ChatClient.open(b, await login(b.base_url, "bob"))
    # Changed by a third process (a management shell, a worker): reaches both through Redis.
    run_django_script(_CHANGE_SCRIPT, redis_env, "deactivate")
    codes = await asyncio.gather(*(close_code(ws) for ws in sockets))
    assert codes == [4401, 4401]
    assert await still_open(bob)
    await bob.close()


@pytest.mark.redis
async def test_removal_from_a_private_room_reaches_every_process(
    redis_pair: tuple[DaphneServer, DaphneServer], redis_env: dict[str, str]
) -> None:
    a, b = redis_pair
    cookie = await login(a.base_url, "alice")
    secret = [await ws_connect(server, "/ws/chat/secret/", cookie) for server in (a, b)]
    lobby = await ChatClient.open(b, cookie)
    run_django_script(_CHANGE_SCRIPT, redis_env, "remove")
    codes = await asyncio.gather(*(close_code(ws) for ws in secret))
    assert codes == [4403, 4403]
    assert await still_open(lobby)
    # Reconnecting does not help: the handshake is refused the same way.
    again = await ws_connect(a, "/ws/chat/secret/", cookie)
    assert await close_code(again) == 4403
    await lobby.close()
