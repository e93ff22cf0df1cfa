"""Test helpers for host sites: a logged-in room socket in-process, and a live daphne.

Nothing imports this module at run time; it needs only what the apps need (``channels``'
testing helpers, ``daphne``), and ``httpx`` for ``LiveServer.wait``'s health probe.

``room_communicator`` goes through the host's whole WebSocket stack (``ASGI_APPLICATION``, or
the one-call wiring): the session cookie, the origin check and the routes under
``CHAT_WEBSOCKET_PREFIX``, as a browser would. Frames are read one by one, whether the server
batched them into a JSON array or not, and ambient frames (presence, typing, read markers)
can be skipped.

``live_server`` runs ``python -m realtime_kit.server`` (daphne with the drain) on a free port
with the host's settings, for tests that need a real server: browsers, several processes.
The server is another process: it sees the database named by the settings and ``env``, not
an in-memory test database, so point it at a file or a PostgreSQL database the test prepared.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.utils.module_loading import import_string

from .routing import room_ws_path

DEFAULT_TIMEOUT_SECONDS = 5.0
# Frames that arrive on their own schedule; tests of messages usually skip them.
AMBIENT_FRAMES = frozenset({"presence_state", "presence_diff", "read_state", "read", "typing"})
TEST_HOST = "testserver"
SERVER_START_TIMEOUT_SECONDS = 20.0


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


# --- a live server --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    """A daphne serving the host's ``application`` (``"mysite.asgi:application"``)."""

    application: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    health_path: str = "/healthz"
    args: list[str] = field(default_factory=list)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def start(self) -> LiveServer:
        """Start the server and wait until ``health_path`` answers 200."""
        module = os.environ.get("DJANGO_SETTINGS_MODULE") or settings.SETTINGS_MODULE
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": module, **self.env}
        env["PYTHONUNBUFFERED"] = "1"
        args = [sys.executable, "-m", "realtime_kit.server", "-b", "127.0.0.1"]
        args += ["-p", str(self.port), *self.args, self.application]
        self.log_path = Path(tempfile.mkstemp(prefix="live-daphne-", suffix=".log")[1])
        with open(self.log_path, "ab") as log:
            # Our own interpreter and module; the host's test names the application.
            self.proc = subprocess.Popen(  # noqa: S603
                args,
                env=env,
                cwd=self.cwd or Path.cwd(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait()
        return self

    def wait(self, timeout: float = SERVER_START_TIMEOUT_SECONDS) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"daphne exited at start:\n{self.log()}")
            try:
                if httpx.get(self.base_url + self.health_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daphne not ready after {timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        """The server's output so far (attach it to a failing test's report)."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        """SIGTERM (the runner drains), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def live_server(application: str, **options: Any) -> Iterator[LiveServer]:
    """A started ``LiveServer`` for the ``with`` block (see ``LiveServer`` for the options)."""
    server = LiveServer(application, **options).start()
    try:
        yield server
    finally:
        server.stop()
