"""WebSocket handshakes against a real daphne: Django's CSRF origin rule, and unknown paths.

docs/protocol.md ("Connecting") is the spec. The rule is the one Django applies to a POST, so
each origin is also tried on the login form: the socket must be accepted exactly when the
POST passes the CSRF check. One daphne serves the module (a refused handshake stores nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import base_env, copy_sqlite
from tests.servers import (
    TEST_PASSWORD,
    DaphneServer,
    free_port,
    login_sync,
    recv_chat_frames,
    ws_connect,
)

pytestmark = [pytest.mark.e2e]

TRUSTED = "https://chat.example.com"
TRUSTED_WILDCARD = "https://*.trusted.example"


@pytest.fixture(scope="module")
def server(
    sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaphneServer]:
    path = tmp_path_factory.mktemp("origin-e2e") / "db.sqlite3"
    copy_sqlite(sqlite_template, path)
    env = base_env(
        SQLITE_PATH=str(path), DJANGO_CSRF_TRUSTED_ORIGINS=f"{TRUSTED},{TRUSTED_WILDCARD}"
    )
    daphne = DaphneServer(env)
    daphne.start()
    yield daphne
    daphne.cleanup()


@pytest.fixture(scope="module")
def cookie(server: DaphneServer) -> str:
    return login_sync(server.base_url, "alice")


def refused(server: DaphneServer) -> list[str]:
    """Origins Django's CSRF check refuses for a page of ``server`` (127.0.0.1:<port>)."""
    other_port = free_port()
    return [
        f"http://127.0.0.1:{other_port}",  # another port of the same host
        "http://127.0.0.1",  # no port: port 80
        f"https://127.0.0.1:{server.port}",  # another scheme
        f"ws://127.0.0.1:{server.port}",
        f"http://localhost:{server.port}",  # an allowed host, but not this request's host
        "http://evil.example",
        f"http://127.0.0.1.evil.example:{server.port}",
        "https://evil.chat.example.com",  # trusted exactly, not its subdomains
        "http://a.trusted.example",  # the wildcard entry is https only
        "https://trusted.example.evil",
        "null",  # sandboxed iframes and file:// pages
    ]


def accepted(server: DaphneServer) -> list[str]:
    return [server.base_url, TRUSTED, "https://a.trusted.example", "https://a.b.trusted.example"]


async def handshake_status(server: DaphneServer, cookie: str, origin: str | None) -> int:
    """101 when the socket opened (and said hello), else the handshake's HTTP status."""
    try:
        ws = await ws_connect(server, "/ws/chat/lobby/", cookie, origin=origin)
    except InvalidStatus as exc:
        return exc.response.status_code
    try:
        assert (await recv_chat_frames(ws))[0]["type"] == "hello"
    finally:
        await ws.close()
    return 101


def login_post_status(server: DaphneServer, origin: str) -> int:
    """Status of a login POST with a valid CSRF token and this Origin (403: CSRF refused)."""
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        client.get("/accounts/login/")
        form = {
            "username": "alice",
            "password": TEST_PASSWORD,
            "csrfmiddlewaretoken": client.cookies["csrftoken"],
        }
        return client.post("/accounts/login/", data=form, headers={"Origin": origin}).status_code


async def test_origins_csrf_refuses_are_refused_at_handshake(
    server: DaphneServer, cookie: str
) -> None:
    for origin in refused(server):
        assert await handshake_status(server, cookie, origin) == 403, origin
        assert login_post_status(server, origin) == 403, origin
    # No Origin at all: HTTP would fall back to the CSRF token, which a handshake cannot
    # carry. Browsers always send Origin; a client that does not can send the right one.
    assert await handshake_status(server, cookie, None) == 403


async def test_same_origin_and_trusted_origins_are_accepted(
    server: DaphneServer, cookie: str
) -> None:
    for origin in accepted(server):
        assert await handshake_status(server, cookie, origin) == 101, origin
        assert login_post_status(server, origin) == 302, origin


# --- unknown paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws/nowhere/", "/ws/chat/", "/ws/chat/no%20slug/", "/"])
async def test_unknown_path_closes_4404_without_a_traceback(
    server: DaphneServer, cookie: str, path: str
) -> None:
    ws = await ws_connect(server, path, cookie)
    with pytest.raises(ConnectionClosed) as info:
        await recv_chat_frames(ws, timeout=5)
    assert info.value.rcvd is not None, "the server closed without a close frame"
    assert info.value.rcvd.code == 4404
    # Not a server fault: nothing in daphne's log says otherwise.
    assert "Traceback" not in server.log_tail(), server.log_tail()
    assert "Exception inside application" not in server.log_tail()
    # The origin is checked first, as for every path.
    with pytest.raises(InvalidStatus) as refusal:
        await ws_connect(server, path, cookie, origin="http://evil.example")
    assert refusal.value.response.status_code == 403
