"""Test helpers for host sites: a logged-in room socket in-process, and a live daphne.

Nothing imports this module at run time; it needs only what the apps need (``channels``'
testing helpers, ``daphne``), and ``httpx`` for ``LiveServer.wait``'s health probe.

``room_communicator`` goes through the host's whole WebSocket stack (``ASGI_APPLICATION``, or
the one-call wiring): the session cookie, the origin check and the routes under
``CHAT_WEBSOCKET_PREFIX``, as a browser would. Frames are read one by one, whether the server
batched them into a JSON array or not, and ambient frames (presence, typing, read markers)
can be skipped.

``live_server`` (from ``realtime_kit.testing``) runs ``python -m realtime_kit.server`` (daphne
with the drain) on a free port with the host's settings, for tests that need a real server:
browsers, several processes.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.utils.module_loading import import_string

from realtime_kit.testing import LiveServer, free_port, live_server

from .routing import room_ws_path

__all__ = ["LiveServer", "RoomCommunicator", "free_port", "live_server", "room_communicator"]

DEFAULT_TIMEOUT_SECONDS = 5.0
# Frames that arrive on their own schedule; tests of messages usually skip them.
AMBIENT_FRAMES = frozenset({"presence_state", "presence_diff", "read_state", "read", "typing"})
TEST_HOST = "testserver"


class RoomCommunicator(WebsocketCommunicator):
    """A ``WebsocketCommunicator`` that reads chat frames one at a time."""

    def __init__(self, application: Any, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(application, path, headers=headers)
        self.pending: list[dict[str, Any]] = []

    async def receive_frame(
        self, skip: frozenset[str] = AMBIENT_FRAMES, seconds: float = DEFAULT_TIMEOUT_SECONDS
    ) -> dict[str, Any]:
        """The next frame whose type is not in ``skip``."""
        while True:
            while self.pending:
                frame = self.pending.pop(0)
                if frame.get("type") not in skip:
                    return frame
            data = json.loads(await self.receive_from(timeout=seconds))
            self.pending = list(data) if isinstance(data, list) else [data]

    async def receive_type(
        self, frame_type: str, seconds: float = DEFAULT_TIMEOUT_SECONDS
    ) -> dict[str, Any]:
        """The next frame of ``frame_type``; frames before it are dropped."""
        while True:
            frame = await self.receive_frame(skip=frozenset(), seconds=seconds)
            if frame.get("type") == frame_type:
                return frame

    async def send_message(self, text: str, client_id: str | None = None) -> str:
        """Send a ``message`` frame; return its ``client_id`` (to match the ``ack``)."""
        client_id = client_id or uuid.uuid4().hex
        await self.send_json_to({"type": "message", "text": text, "client_id": client_id})
        return client_id


def _session_cookie(user: Any) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


def _application(application: Any | None) -> Any:
    if application is not None:
        return application
    return import_string(settings.ASGI_APPLICATION)


@contextlib.asynccontextmanager
async def room_communicator(
    user: Any,
    slug: str,
    application: Any | None = None,
    query: str = "",
    host: str = TEST_HOST,
) -> AsyncIterator[RoomCommunicator]:
    """A connected socket of ``user`` (logged in through a real session) to room ``slug``.

    ``application`` defaults to ``ASGI_APPLICATION``; the handshake carries the page's own
    ``Origin`` (``http://<host>``, ``host`` in ``ALLOWED_HOSTS``). Raises AssertionError
    with the close code when the server refuses the socket; disconnects on exit.
    """
    cookie = await sync_to_async(_session_cookie)(user)
    headers = [
        (b"cookie", cookie.encode()),
        (b"origin", f"http://{host}".encode()),
        (b"host", host.encode()),
    ]
    path = room_ws_path(slug) + (f"?{query}" if query else "")
    comm = RoomCommunicator(_application(application), path, headers)
    connected, code = await comm.connect(timeout=DEFAULT_TIMEOUT_SECONDS)
    if not connected:
        raise AssertionError(f"the socket to {path} was refused (close code {code})")
    try:
        yield comm
    finally:
        await comm.disconnect()
