"""The runner (``python -m realtime_kit.server``) on real processes: drain on SIGTERM, HTTP bounds.

Every test starts the server the way ``make run`` does and sends SIGTERM to it like a process
manager would. What clients must see (docs/deployment.md, "Drain on deploy"): WebSockets
closed with 1012, SSE bodies that end normally (final chunk), room assistant replies stored
as ``interrupted`` with their ``assistant.end`` before the close, in-flight requests answered,
and a process that exits 0 within the drain bound. Resuming on the restarted server (chat
``?after=``, notifications ``Last-Event-ID``) must lose nothing and repeat nothing.

Under plain daphne 4.2.3 all of them fail: it stops at once (1006, cut bodies, SIGSEGV), reads
dripping headers for as long as they come, and spools any request body before answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from websockets.exceptions import ConnectionClosed

from tests.conftest import copy_sqlite
from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401
from tests.servers import (
    ChatClient,
    DaphneServer,
    login,
    recv_frames,
    run_django_script,
    seed_messages,
)
from tests.test_e2e_assistant_room import Member, assemble, room_env, stored_rows

# The drain and the HTTP bounds are our runner's (realtime_kit.server, over daphne); uvicorn
# has its own graceful shutdown and limits.
pytestmark = [pytest.mark.e2e, pytest.mark.daphne_only]

DRAIN_SECONDS = 5.0
DRAIN_ARGS = ["--drain-timeout", str(DRAIN_SECONDS)]
# The process must be gone within the drain bound; the margin covers a loaded 2-core machine.
EXIT_BOUND_SECONDS = DRAIN_SECONDS + 5.0
WAIT = 15.0
CLOSE_SERVICE_RESTART = 1012

_NOTIFY = textwrap.dedent(
    """
    import django, sys
    django.setup()
    from django.contrib.auth import get_user_model
    from notifications import notify
    user = get_user_model().objects.get(username=sys.argv[1])
    for title in sys.argv[2:]:
        notify(user, title)
    """
)


def sigterm(server: DaphneServer) -> float:
    """Send SIGTERM to the server process (as systemd does); return when it was sent."""
    assert server.proc is not None and server.running
    server.proc.send_signal(signal.SIGTERM)
    return time.monotonic()


async def exit_code(server: DaphneServer, since: float) -> int:
    """Wait for the process to exit within the bound; return its exit status."""
    assert server.proc is not None
    proc = server.proc
    code = await asyncio.to_thread(proc.wait, EXIT_BOUND_SECONDS)
    assert time.monotonic() - since < EXIT_BOUND_SECONDS
    return code


def assert_clean_log(server: DaphneServer) -> None:
    log = server.log_tail(200_000)
    for bad in ("Traceback", "Exception inside application", "Task was destroyed"):
        assert bad not in log, f"{bad!r} in the server log"


async def closed_with(ws: Any, timeout: float = WAIT) -> int | None:
    """Read until the server closes the socket; return the code of its close frame."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await recv_frames(ws, timeout)
    return info.value.rcvd.code if info.value.rcvd is not None else None


# --- WebSockets ------------------------------------------------------------------------------


async def test_sigterm_closes_websockets_with_1012_and_resume_has_no_gap_or_duplicate(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    server = start_daphne(sqlite_env, args=DRAIN_ARGS)
    alice_cookie = await login(server.base_url, "alice")
    bob_cookie = await login(server.base_url, "bob")
    alice = await ChatClient.open(server, alice_cookie)
    bob = await ChatClient.open(server, bob_cookie)
    for i in range(3):
        assert (await alice.post(f"before {i}", f"before-{i}"))["type"] == "ack"
    await bob.wait_seq(3)

    sent = sigterm(server)
    assert await closed_with(alice.ws) == CLOSE_SERVICE_RESTART
    assert await closed_with(bob.ws) == CLOSE_SERVICE_RESTART
    assert await exit_code(server, sent) == 0
    assert_clean_log(server)

    seed_messages(sqlite_env, "lobby", 2)  # stored while the server is down: seq 4 and 5
    server.start()
    resumed = await ChatClient.open(server, bob_cookie, query=f"after={bob.seqs()[-1]}")
    alice = await ChatClient.open(server, alice_cookie, query="after=5")
    assert (await alice.post("after the restart", "after-0"))["type"] == "ack"
    await resumed.wait_seq(6)
    everything = bob.seqs() + resumed.seqs()
    assert everything == list(range(1, 7)), "a gap or a duplicate across the restart"
    await resumed.close()
    await alice.close()


# --- notifications SSE -----------------------------------------------------------------------


class Stream:
    """A notifications SSE stream read in the background; ``error`` says how it ended."""

    def __init__(self, client: httpx.AsyncClient, last_event_id: int | None) -> None:
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        self.ids: list[int] = []
        self.ended = asyncio.Event()
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._read(client, headers))

    async def _read(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        try:
            async with aconnect_sse(client, "GET", "/notifications/stream/", headers=headers) as s:
                assert s.response.status_code == 200
                async for event in s.aiter_sse():
                    if event.event == "notification":
                        self.ids.append(json.loads(event.data)["id"])
        except Exception as exc:  # a cut body: httpx.RemoteProtocolError
            self.error = exc
        finally:
            self.ended.set()

    async def wait_ids(self, count: int) -> None:
        deadline = time.monotonic() + WAIT
        while len(self.ids) < count:
            assert not self.ended.is_set(), f"stream ended: {self.error!r}"
            assert time.monotonic() < deadline, f"only {self.ids}"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def logged_in(server: DaphneServer, username: str) -> AsyncIterator[httpx.AsyncClient]:
    cookie = await login(server.base_url, username)
    timeout = httpx.Timeout(10.0, read=60.0)
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Cookie": cookie}, timeout=timeout
    ) as client:
        yield client


def stored_notification_ids(env: dict[str, str], username: str) -> list[int]:
    with contextlib.closing(sqlite3.connect(env["SQLITE_PATH"])) as db:
        rows = db.execute(
            "SELECT n.id FROM notifications_notification n JOIN auth_user u"
            " ON u.id = n.recipient_id WHERE u.username = ? ORDER BY n.id",
            (username,),
        ).fetchall()
    return [row[0] for row in rows]


async def test_sigterm_ends_notification_stream_cleanly_and_last_event_id_loses_nothing(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    # Notifications are sent by other processes: the server finds them by its poll.
    env = {**sqlite_env, "NOTIFICATIONS_POLL_SECONDS": "0.2"}
    server = start_daphne(env, args=DRAIN_ARGS)
    run_django_script(_NOTIFY, env, "alice", "before 1", "before 2")
    async with logged_in(server, "alice") as client:
        stream = Stream(client, last_event_id=0)
        await stream.wait_ids(2)
        sent = sigterm(server)
        await asyncio.wait_for(stream.ended.wait(), WAIT)
        assert stream.error is None, f"the body was cut: {stream.error!r}"
    assert await exit_code(server, sent) == 0
    assert_clean_log(server)

    run_django_script(_NOTIFY, env, "alice", "while down")
    server.start()
    async with logged_in(server, "alice") as client:
        resumed = Stream(client, last_event_id=stream.ids[-1])
        await resumed.wait_ids(1)
        run_django_script(_NOTIFY, env, "alice", "after the restart")
        await resumed.wait_ids(2)
        await resumed.close()
    assert stream.ids + resumed.ids == stored_notification_ids(env, "alice")
    assert len(stored_notification_ids(env, "alice")) == 4


# --- the assistant ---------------------------------------------------------------------------


@pytest.fixture
def assistant_db(sqlite_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "assistant.sqlite3"
    copy_sqlite(sqlite_template, path)
    return path


async def test_sigterm_interrupts_a_room_reply_which_is_stored_and_ended_before_the_close(
    start_daphne: Callable[..., DaphneServer],
    assistant_db: Path,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    tokens = [f"w{i} " for i in range(400)]  # 20 s of reply: the restart comes first
    fake_openai.scenario = Scenario(tokens=tokens, delay=0.05)
    server = start_daphne(room_env(fake_openai, assistant_db), args=DRAIN_ARGS)
    alice_cookie = await login(server.base_url, "alice")
    alice = await Member.open(server, alice_cookie)
    bob = await Member.open(server, await login(server.base_url, "bob"))
    sid = await alice.ask()
    for _ in range(3):
        await bob.frame("assistant.delta", stream_id=sid)

    sent = sigterm(server)
    for member in (alice, bob):
        end = await member.frame("assistant.end", stream_id=sid)
        assert end["status"] == "interrupted" and end["seq"] is not None, end
        stored = member.message(end["seq"])
        assert stored["status"] == "interrupted" and stored["client_id"] == sid
        assert stored["text"] == assemble(member.of_stream(sid))
        assert stored["text"] and stored["text"] != "".join(tokens)
        assert await closed_with(member.ws) == CLOSE_SERVICE_RESTART
    assert await exit_code(server, sent) == 0
    assert_clean_log(server)
    closed = await asyncio.to_thread(fake_openai.wait_until, lambda f: f.open_streams == 0, WAIT)
    assert closed, "the upstream stream was left open"
    seq, user, text, status = stored_rows(assistant_db)[-1]
    assert (seq, user, status) == (end["seq"], "assistant", "interrupted")
    assert text == stored["text"]

    server.start()
    resumed = await Member.open(server, alice_cookie, query=f"?after={end['seq']}")
    await resumed.send({"type": "message", "text": "thanks anyway", "client_id": "after"})
    ack = await resumed.frame("ack")
    assert ack["seq"] == end["seq"] + 1
    await resumed.wait_for(lambda f: f["type"] == "message" and f["seq"] == ack["seq"])
    assert [f["seq"] for f in resumed.log if f["type"] == "message"] == [ack["seq"]]
    await resumed.close()


async def test_sigterm_ends_the_assistant_panel_stream_as_interrupted(
    start_daphne: Callable[..., DaphneServer],
    assistant_db: Path,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    fake_openai.scenario = Scenario(tokens=["tok "] * 400, delay=0.05)
    server = start_daphne(room_env(fake_openai, assistant_db), args=DRAIN_ARGS)
    cookie = await login(server.base_url, "alice")
    headers = {"Cookie": cookie, "X-CSRFToken": cookie.split("csrftoken=")[1]}
    events: list[tuple[str, str]] = []
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=WAIT) as http:
        body = {"messages": [{"role": "user", "content": "Tell me a story"}]}
        async with aconnect_sse(http, "POST", "/chat/assistant/stream/", json=body) as source:
            assert source.response.status_code == 200
            # Reading to the end raises if the body is cut instead of ended.
            async for event in source.aiter_sse():
                events.append((event.event, event.data))
                if len(events) == 3:
                    sent = sigterm(server)
    kind, data = events[-1]
    assert kind == "error" and json.loads(data)["code"] == "interrupted", events[-3:]
    assert all(json.loads(d)["content"] == "tok " for _, d in events[:-1])
    assert await exit_code(server, sent) == 0
    assert_clean_log(server)


# --- requests in flight, the drain bound ----------------------------------------------------


def raw_connection(server: DaphneServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    return sock


def read_one_response(sock: socket.socket) -> bytes:
    """One response (headers and a Content-Length body) from a connection kept alive."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


async def test_drain_answers_requests_in_flight_refuses_new_ones_and_stops_at_its_bound(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    server = start_daphne(sqlite_env, args=["--drain-timeout", "3"])
    head = b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n"
    finishing, stalled = raw_connection(server), raw_connection(server)
    for sock in (finishing, stalled):
        sock.sendall(head + b"12345")
    await asyncio.sleep(0.5)  # both requests are being received

    sent = sigterm(server)
    deadline = time.monotonic() + WAIT
    while True:  # the port closes at once, while the process still drains
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting connections"
        await asyncio.sleep(0.05)
    assert server.running

    finishing.sendall(b"67890")
    answer = await asyncio.to_thread(read_response, finishing)
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    assert b"connection: close" in answer.lower()
    # The stalled request holds the process until the bound, then it exits 0 all the same.
    assert await exit_code(server, sent) == 0
    assert await asyncio.to_thread(read_response, stalled) == b""
    assert "Drain timeout" in server.log_tail()
    for sock in (finishing, stalled):
        sock.close()


# --- HTTP bounds ------------------------------------------------------------------------------


def drip_until_closed(sock: socket.socket, first: bytes, interval: float, limit: float) -> bytes:
    """Send ``first``, then one header byte every ``interval`` s; return what the server said.

    Raises AssertionError if the server still listens after ``limit`` seconds.
    """
    sock.sendall(first)
    sock.settimeout(interval)
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(b"x")
            except OSError:
                return b""
            continue
        except ConnectionResetError:
            return b""
        return data + read_response(sock) if data else b""
    raise AssertionError(f"a dripping request is still open after {limit:g} s")


async def test_request_headers_that_drip_are_cut_after_the_header_timeout(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    server = start_daphne(sqlite_env, args=["--request-header-timeout", "2"])
    # Slow but complete within the bound: served.
    ok = raw_connection(server)
    ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await asyncio.sleep(1)
    ok.sendall(b"Connection: close\r\n\r\n")
    assert (await asyncio.to_thread(read_response, ok)).startswith(b"HTTP/1.1 200")
    ok.close()
    # One byte every 0.5 s restarts Twisted's idle timeout forever; the header deadline not.
    drip = raw_connection(server)
    first = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    answer = await asyncio.to_thread(drip_until_closed, drip, first, 0.5, 20.0)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    drip.close()
    # A request on a kept-alive connection gets its own deadline.
    reused = raw_connection(server)
    reused.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await asyncio.to_thread(read_one_response, reused)).startswith(b"HTTP/1.1 200")
    answer = await asyncio.to_thread(drip_until_closed, reused, first, 0.5, 20.0)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    reused.close()


BODY_LIMIT = 65536
# realtime_kit.protocols.REFUSED_LINGER_SECONDS (5 s), with a generous margin.
LINGER_BOUND_SECONDS = 15.0


def send_until_reset(sock: socket.socket, limit: float) -> bool:
    """Keep sending body bytes; True once the server resets the connection within ``limit``."""
    started = time.monotonic()
    sock.settimeout(1)
    while time.monotonic() - started < limit:
        try:
            sock.sendall(b"\0" * 65536)
        except TimeoutError:
            continue
        except OSError:  # ECONNRESET or EPIPE
            return True
    return False


async def test_a_body_over_the_bound_is_refused_before_it_is_read(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    server = start_daphne(sqlite_env, args=["--max-request-body-bytes", str(BODY_LIMIT)])
    head = b"POST /accounts/login/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    # An anonymous 1 GiB POST: refused on its Content-Length, after the first 64 KiB sent.
    declared = raw_connection(server)
    declared.sendall(head + b"Content-Length: %d\r\n\r\n" % (1 << 30) + b"\0" * BODY_LIMIT)
    answer = await asyncio.to_thread(read_response, declared)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # What it goes on sending is read and dropped for a while (the linger), then it is reset.
    assert await asyncio.to_thread(send_until_reset, declared, LINGER_BOUND_SECONDS)
    declared.close()
    # A chunked body declares nothing: refused once it passes the bound, before its end.
    chunked = raw_connection(server)
    chunked.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(BODY_LIMIT // 16384 + 1):
        chunked.sendall(b"4000\r\n" + b"\0" * 16384 + b"\r\n")
    answer = await asyncio.to_thread(read_response, chunked)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    chunked.close()
    # An ordinary client reads the 413; a body at the bound reaches Django (403: no CSRF).
    async with httpx.AsyncClient(base_url=server.base_url, timeout=WAIT) as client:
        over = await client.post("/accounts/login/", content=b"\0" * (4 * BODY_LIMIT))
        assert over.status_code == 413
        at = await client.post("/accounts/login/", content=b"\0" * BODY_LIMIT)
        assert at.status_code == 403
