"""chat.testing, the helpers host teams use in their own tests."""

from __future__ import annotations

import json

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import override_settings
from websockets.asyncio.client import connect

from chat.models import Room
from chat.testing import live_server, room_communicator
from realtime_kit.asgi import get_asgi_application
from tests import servers


@pytest.mark.django_db(transaction=True)
async def test_room_communicator_is_a_logged_in_socket_through_the_host_stack() -> None:
    user = await get_user_model().objects.acreate(username="dora")
    await Room.objects.acreate(slug="lobby", title="Lobby")
    async with room_communicator(user, "lobby") as comm:
        hello = await comm.receive_frame()
        assert hello["type"] == "hello"
        assert hello["user"] == {"id": user.pk, "username": "dora"}
        client_id = await comm.send_message("hi from a host test")
        ack = await comm.receive_type("ack")
        assert ack["client_id"] == client_id


@pytest.mark.django_db(transaction=True)
async def test_room_communicator_follows_the_prefix_and_reports_refusals() -> None:
    user = await get_user_model().objects.acreate(username="dora")
    await Room.objects.acreate(slug="lobby", title="Lobby")
    with override_settings(CHAT_WEBSOCKET_PREFIX="community/ws/"):
        application = get_asgi_application()
        async with room_communicator(user, "lobby", application=application) as comm:
            assert comm.scope["path"] == "/community/ws/lobby/"
            assert (await comm.receive_frame())["type"] == "hello"
    # A host not in ALLOWED_HOSTS: the handshake is denied, and the helper says so.
    with pytest.raises(AssertionError, match="refused"):
        async with room_communicator(user, "lobby", host="evil.example"):
            pass


async def test_live_server_serves_the_host_settings(sqlite_env: dict[str, str]) -> None:
    with live_server("project.asgi:application", env=sqlite_env, cwd=servers.REPO_ROOT) as server:
        assert httpx.get(server.base_url + "/healthz", timeout=5).json()["database"] is True
        cookie = await servers.login(server.base_url, "alice")
        async with connect(
            server.ws_url("/ws/chat/lobby/"),
            additional_headers={"Cookie": cookie},
            origin=server.base_url,  # type: ignore[arg-type]
        ) as ws:
            first = json.loads(await ws.recv())
            frames = first if isinstance(first, list) else [first]
            assert frames[0]["type"] == "hello"
            assert frames[0]["user"]["username"] == "alice"
    assert server.proc is not None and server.proc.poll() is not None
