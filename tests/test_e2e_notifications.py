"""Notifications end to end: real daphne processes, a real SSE client (httpx + httpx-sse).

Each test starts daphne on its own copy of a seeded SQLite file (alice, bob, carol and the
superuser ``root``) and logs in through the login form. Notifications are sent the ways a site
sends them: the admin's "Send notification" form (inside daphne), ``manage.py notify`` (another
process), and @mentions in chat. Waits have generous timeouts; nothing asserts on timing.
docs/protocol.md ("Notifications SSE stream") is the spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from notifications.testing import SSEStream, open_stream
from tests.conftest import base_env, copy_sqlite
from tests.servers import (
    REPO_ROOT,
    TEST_PASSWORD,
    DaphneServer,
    RedisServer,
    login,
    recv_until,
    run_django_script,
    server_threads,
    ws_connect,
)

pytestmark = [pytest.mark.e2e]

STAFF = "root"
STREAM = "/notifications/stream/"
WAIT = 15.0  # seconds; generous for a loaded 2-core machine
NOTIFICATION_KEYS = {"id", "title", "body", "url", "level", "created_at", "read"}

_ADD_STAFF = textwrap.dedent(
    """
    import django, sys
    django.setup()
    from django.contrib.auth import get_user_model
    user, _ = get_user_model().objects.get_or_create(username=sys.argv[1])
    user.is_staff = user.is_superuser = True
    user.set_password(sys.argv[2])
    user.save()
    """
)

_SEED = textwrap.dedent(
    """
    import django, sys
    django.setup()
    from django.contrib.auth import get_user_model
    from notifications import notify
    user = get_user_model().objects.get(username=sys.argv[1])
    for i in range(int(sys.argv[2])):
        notify(user, f"seed {i}")
    """
)


@pytest.fixture(scope="session")
def notifications_template(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chat test database plus a superuser, prepared once."""
    path = tmp_path_factory.mktemp("notifications-template") / "template.sqlite3"
    copy_sqlite(sqlite_template, path)
    run_django_script(_ADD_STAFF, base_env(SQLITE_PATH=str(path)), STAFF, TEST_PASSWORD)
    return path


@pytest.fixture
def env(tmp_path: Path, notifications_template: Path) -> dict[str, str]:
    path = tmp_path / "notifications.sqlite3"
    copy_sqlite(notifications_template, path)
    return base_env(SQLITE_PATH=str(path))


@pytest.fixture
def server(start_daphne: Callable[..., DaphneServer], env: dict[str, str]) -> DaphneServer:
    return start_daphne(env)


# --- helpers -----------------------------------------------------------------------------------


class Session:
    """A logged-in user's HTTP client (cookies and CSRF token) on one server."""

    def __init__(self, server: DaphneServer, cookie: str) -> None:
        self.server = server
        self.csrf = cookie.split("csrftoken=")[1].split(";")[0]
        self.client = httpx.AsyncClient(
            base_url=server.base_url,
            headers={"Cookie": cookie},
            timeout=httpx.Timeout(10.0, read=60.0),
            limits=httpx.Limits(max_connections=50),
        )

    def stream(self, last_event_id: int | str | None = None, path: str = STREAM) -> Any:
        return open_stream(self.client, path, last_event_id=last_event_id)

    async def post(self, path: str, csrf: bool = True) -> httpx.Response:
        headers = {"X-CSRFToken": self.csrf} if csrf else {}
        return await self.client.post(path, headers=headers)

    async def send(self, usernames: str, title: str, **fields: str) -> None:
        """Send a notification with the admin's form (needs a staff session)."""
        data = {"audience": "users", "usernames": usernames, "title": title, "level": "info"}
        response = await self.client.post(
            "/admin/notifications/notification/send/",
            data={**data, **fields},
            headers={"X-CSRFToken": self.csrf},
        )
        assert response.status_code == 302, response.text[:2000]

    async def close(self) -> None:
        await self.client.aclose()


@contextlib.asynccontextmanager
async def session(server: DaphneServer, username: str) -> AsyncIterator[Session]:
    s = Session(server, await login(server.base_url, username))
    try:
        yield s
    finally:
        await s.close()


def stored_ids(env: dict[str, str], username: str) -> list[int]:
    with sqlite3.connect(env["SQLITE_PATH"]) as conn:
        rows = conn.execute(
            "SELECT n.id FROM notifications_notification n JOIN auth_user u "
            "ON u.id = n.recipient_id WHERE u.username = ? ORDER BY n.id",
            (username,),
        ).fetchall()
    conn.close()
    return [row[0] for row in rows]


def cli_notify(env: dict[str, str], *args: str) -> str:
    """``manage.py notify`` in its own process, as an operator would run it."""
    result = subprocess.run(
        [sys.executable, "manage.py", "notify", *args],
        cwd=REPO_ROOT,
        env={**base_env(), **env, "DJANGO_SETTINGS_MODULE": "project.settings"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def acli_notify(env: dict[str, str], *args: str) -> str:
    return await asyncio.to_thread(cli_notify, env, *args)


def assert_unique_increasing(ids: list[int]) -> None:
    assert ids == sorted(set(ids)), f"duplicates or disorder: {ids}"


# --- the stream --------------------------------------------------------------------------------


async def test_first_bytes_arrive_at_once(server: DaphneServer) -> None:
    async with session(server, STAFF) as staff:
        await staff.send("alice", "before connecting")
    async with session(server, "alice") as alice:
        headers = {"Accept": "text/event-stream"}
        async with alice.client.stream("GET", STREAM, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            text = ""
            chunks = response.aiter_text()
            while "event: unread" not in text or not text.endswith("\n\n"):
                text += await asyncio.wait_for(anext(chunks), WAIT)
    assert text.startswith("retry: ")
    unread = text.split("event: unread\ndata: ")[1].split("\n")[0]
    assert json.loads(unread) == {"count": 1, "last_id": stored_ids(server.extra_env, "alice")[0]}
    assert "event: notification" not in text, "no Last-Event-ID: nothing is replayed"


async def test_live_delivery_and_isolation(server: DaphneServer) -> None:
    async with (
        session(server, STAFF) as staff,
        session(server, "alice") as alice,
        session(server, "bob") as bob,
        alice.stream() as alice_stream,
        bob.stream() as bob_stream,
    ):
        assert (await alice_stream.unread())["count"] == 0
        assert (await bob_stream.unread())["count"] == 0
        await staff.send("alice", "For alice", body="line 1\nline 2", url="/chat/lobby/")
        event = await alice_stream.wait_event(lambda e: e.event == "notification", WAIT)
        data = json.loads(event.data)
        assert set(data) == NOTIFICATION_KEYS
        assert event.id == str(data["id"]) == str(stored_ids(server.extra_env, "alice")[0])
        assert data["title"] == "For alice"
        assert data["body"] == "line 1\nline 2"
        assert (data["url"], data["level"], data["read"]) == ("/chat/lobby/", "info", False)
        await staff.send("bob", "For bob")
        assert (await bob_stream.notification(WAIT))["title"] == "For bob"
        assert [n["title"] for n in bob_stream.notifications()] == ["For bob"]
        assert [n["title"] for n in alice_stream.notifications()] == ["For alice"]
        await staff.send("alice,bob", "For both")
        assert (await alice_stream.notification(WAIT))["title"] == "For both"
        assert (await bob_stream.notification(WAIT))["title"] == "For both"


async def test_keepalive_comment(
    start_daphne: Callable[..., DaphneServer], env: dict[str, str]
) -> None:
    server = start_daphne({**env, "NOTIFICATIONS_KEEPALIVE_SECONDS": "1"})
    async with session(server, "alice") as alice, alice.stream() as stream:
        await stream.unread()
        assert await stream.comment(WAIT) == "keepalive"
        assert await stream.comment(WAIT) == "keepalive"


async def test_replay_after_last_event_id(server: DaphneServer) -> None:
    async with session(server, STAFF) as staff:
        for i in range(5):
            await staff.send("alice", f"n{i}")
    ids = stored_ids(server.extra_env, "alice")
    async with session(server, "alice") as alice:
        # Header: everything after ids[1], in order, then live ones.
        async with alice.stream(last_event_id=ids[1]) as stream:
            assert (await stream.unread())["count"] == 5
            assert [n["id"] for n in await stream.wait_notifications(3, WAIT)] == ids[2:]
            async with session(server, STAFF) as staff:
                await staff.send("alice", "live")
            await stream.wait_notifications(4, WAIT)
            ids = stored_ids(server.extra_env, "alice")
            assert stream.notification_ids() == ids[2:]
            assert [e.id for e in stream.events if e.event == "notification"] == [
                str(i) for i in ids[2:]
            ]
        # Query parameter, as bell.js reconnects.
        async with alice.stream(path=f"{STREAM}?last_event_id={ids[3]}") as stream:
            assert [n["id"] for n in await stream.wait_notifications(2, WAIT)] == ids[4:]
        # The header wins over the query parameter.
        async with alice.stream(last_event_id=ids[4], path=f"{STREAM}?last_event_id=0") as stream:
            assert [n["id"] for n in await stream.wait_notifications(1, WAIT)] == ids[5:]
        # An id beyond the newest replays nothing; a malformed one is refused.
        async with alice.stream(last_event_id=ids[-1] + 1000) as stream:
            await stream.unread()
            assert stream.notifications() == []
        response = await alice.client.get(STREAM, headers={"Last-Event-ID": "oops"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "bad_last_event_id"


async def test_notifications_during_replay_arrive_once_in_order(
    start_daphne: Callable[..., DaphneServer], env: dict[str, str]
) -> None:
    # Small replay pages: the replay takes many database round trips, and live notifications
    # sent meanwhile queue up behind it.
    server = start_daphne({**env, "NOTIFICATIONS_REPLAY_BATCH_SIZE": "5"})
    run_django_script(_SEED, env, "alice", "200")
    live_count = 25
    async with session(server, STAFF) as staff, session(server, "alice") as alice:

        async def send_live() -> None:
            for i in range(live_count):
                await staff.send("alice", f"live {i}")

        async with alice.stream(last_event_id=0) as stream:
            sender = asyncio.create_task(send_live())
            await stream.unread()
            await sender
            received = await stream.wait_notifications(200 + live_count, 60)
            await asyncio.sleep(0.5)  # nothing more may come: no duplicates
            ids = stream.notification_ids()
    assert len(received) == 200 + live_count
    assert_unique_increasing(ids)
    assert ids == stored_ids(env, "alice")
    titles = [n["title"] for n in stream.notifications()]
    assert titles[:200] == [f"seed {i}" for i in range(200)]
    assert titles[200:] == [f"live {i}" for i in range(live_count)]


async def test_anonymous_requests_get_401(server: DaphneServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        for path in [STREAM, "/notifications/"]:
            response = await client.get(path, headers={"Accept": "text/event-stream"})
            assert response.status_code == 401
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["code"] == "unauthenticated"
        # Without a CSRF token a POST is refused before anything else.
        assert (await client.post("/notifications/read-all/")).status_code == 403


async def test_mark_read_csrf_and_live_unread_in_every_tab(server: DaphneServer) -> None:
    async with session(server, STAFF) as staff:
        await staff.send("alice", "first")
        await staff.send("alice", "second")
        await staff.send("bob", "bob's")
    first, second = stored_ids(server.extra_env, "alice")
    (bobs,) = stored_ids(server.extra_env, "bob")
    async with (
        session(server, "alice") as alice,
        session(server, "bob") as bob,
        alice.stream() as tab1,
        alice.stream() as tab2,
    ):
        assert (await tab1.unread())["count"] == 2
        assert (await tab2.unread())["count"] == 2
        assert (await alice.post(f"/notifications/{first}/read/", csrf=False)).status_code == 403
        response = await alice.post(f"/notifications/{first}/read/")
        assert response.status_code == 200
        assert response.json() == {"unread": 1, "last_id": second}
        assert await tab1.unread(WAIT) == {"count": 1, "last_id": second}
        assert await tab2.unread(WAIT) == {"count": 1, "last_id": second}
        # Someone else's notification does not exist for you.
        assert (await alice.post(f"/notifications/{bobs}/read/")).status_code == 404
        assert (await bob.post(f"/notifications/{second}/read/")).status_code == 404
        assert (await bob.post("/notifications/999999/read/")).status_code == 404
        response = await alice.post("/notifications/read-all/")
        assert response.json()["unread"] == 0
        assert (await tab1.unread(WAIT))["count"] == 0
        assert (await tab2.unread(WAIT))["count"] == 0
        listing = (await alice.client.get("/notifications/")).json()
        assert listing["unread"] == 0
        assert [n["read"] for n in listing["notifications"]] == [True, True]
        bob_listing = (await bob.client.get("/notifications/")).json()
        assert [n["title"] for n in bob_listing["notifications"]] == ["bob's"]
        assert bob_listing["unread"] == 1


async def open_streams(
    s: Session, count: int, stack: contextlib.AsyncExitStack
) -> tuple[list[SSEStream], httpx.Response]:
    """Open ``count`` streams (each up to its first event), then try one more."""
    streams = []
    for _ in range(count):
        stream = await stack.enter_async_context(s.stream())
        await stream.unread()
        streams.append(stream)
    extra = await s.client.get(STREAM, headers={"Accept": "text/event-stream"})
    return streams, extra


async def test_per_user_stream_cap(server: DaphneServer) -> None:
    async with (
        session(server, "alice") as alice,
        session(server, "bob") as bob,
        contextlib.AsyncExitStack() as stack,
    ):
        streams, refused = await open_streams(alice, 10, stack)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/json"
        assert int(refused.headers["retry-after"]) > 0
        assert refused.json()["error"]["code"] == "too_many_streams"
        assert refused.json()["error"]["limit"] == 10
        # Other users are not affected.
        async with bob.stream() as bob_stream:
            await bob_stream.unread()
        # Closing one frees its place.
        await streams[0].close()
        await wait_for_stream(alice)


async def wait_for_stream(s: Session) -> None:
    """Open a stream as soon as the server admits one (a closed one is released promptly)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        try:
            async with s.stream() as stream:
                await stream.unread()
                return
        except AssertionError as exc:
            if "429" not in str(exc) or loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_disconnects_release_streams(server: DaphneServer) -> None:
    async with session(server, "alice") as alice:
        for _ in range(50):
            async with alice.stream() as stream:
                await stream.unread()
        # A leaked stream would keep one of the user's ten places: after 50 cycles all ten
        # are free again (the last closes may take a moment to reach the server).
        await wait_for_stream(alice)
        async with contextlib.AsyncExitStack() as stack, session(server, STAFF) as staff:
            streams, extra = await open_streams(alice, 10, stack)
            assert extra.status_code == 429
            await staff.send("alice", "still live")
            for stream in streams:
                assert (await stream.notification(WAIT))["title"] == "still live"
    assert "Traceback" not in server.log_tail(20000)


async def test_held_streams_keep_no_thread_each(server: DaphneServer) -> None:
    # Django gives every request a thread of its own until the response ends (~22 KiB each);
    # a stream's body ends it once it starts (realtime_kit.threads.release_request_thread).
    held = 8
    async with session(server, "alice") as alice, session(server, STAFF) as staff:
        async with alice.stream() as warm:  # the server's own threads, started once
            await warm.unread()
        before = server_threads(server)
        async with contextlib.AsyncExitStack() as stack:
            streams = []
            for _ in range(held):
                stream = await stack.enter_async_context(alice.stream())
                await stream.unread()
                streams.append(stream)
            during = server_threads(server)
            assert during - before < held // 2, f"{before} threads, {during} with {held} streams"
            await staff.send("alice", "threadless")
            for stream in streams:
                assert (await stream.notification(WAIT))["title"] == "threadless"
        # The end of each response (Django's response.close() on a fresh thread) still runs:
        # every place is free again and nothing failed.
        async with contextlib.AsyncExitStack() as stack:
            streams, extra = await open_streams(alice, 10, stack)
            assert extra.status_code == 429
    assert "Traceback" not in server.log_tail(20000)


async def test_cli_notify_reaches_open_stream_through_the_database(
    start_daphne: Callable[..., DaphneServer], env: dict[str, str]
) -> None:
    # The in-memory layer cannot cross processes: the stream's database poll finds it.
    server = start_daphne({**env, "NOTIFICATIONS_POLL_SECONDS": "1"})
    async with session(server, "alice") as alice, alice.stream() as stream:
        await stream.unread()
        output = await acli_notify(
            env, "--user", "alice", "--title", "From the CLI", "--level", "warning"
        )
        assert "Sent 1 notification" in output
        data = await stream.notification(WAIT)
        assert (data["title"], data["level"]) == ("From the CLI", "warning")
        assert data["id"] == stored_ids(env, "alice")[-1]


@pytest.mark.redis
async def test_redis_carries_notifications_between_processes(
    redis_server: RedisServer, start_daphne: Callable[..., DaphneServer], env: dict[str, str]
) -> None:
    # A poll interval no test waits for: only the channel layer can deliver in time.
    shared = {**env, "REDIS_URL": redis_server.url, "NOTIFICATIONS_POLL_SECONDS": "600"}
    first = start_daphne(shared)
    second = start_daphne(shared)
    async with (
        session(first, "alice") as alice_first,
        session(second, "alice") as alice_second,
        session(second, STAFF) as staff,
        alice_first.stream() as on_first,
        alice_second.stream() as on_second,
    ):
        await on_first.unread()
        await on_second.unread()
        # Sent inside the second daphne: reaches the stream held by the first.
        await staff.send("alice", "across daphnes")
        assert (await on_first.notification(WAIT))["title"] == "across daphnes"
        assert (await on_second.notification(WAIT))["title"] == "across daphnes"
        # Sent by a third process (manage.py with REDIS_URL).
        tag = uuid.uuid4().hex[:8]
        await acli_notify(shared, "--user", "alice", "--title", f"cli {tag}")
        assert (await on_first.notification(WAIT))["title"] == f"cli {tag}"
        assert (await on_second.notification(WAIT))["title"] == f"cli {tag}"
        # Marked read through one process: the unread count changes in both.
        response = await alice_second.post("/notifications/read-all/")
        assert response.json()["unread"] == 0
        assert (await on_first.unread(WAIT))["count"] == 0
        assert (await on_second.unread(WAIT))["count"] == 0
        ids = stored_ids(env, "alice")
        assert on_first.notification_ids() == ids == on_second.notification_ids()


async def test_mention_in_chat_notifies(server: DaphneServer) -> None:
    async with (
        session(server, STAFF) as staff,
        session(server, "bob") as bob,
        session(server, "alice") as alice,
        bob.stream() as bob_stream,
        alice.stream() as alice_stream,
    ):
        await bob_stream.unread()
        await alice_stream.unread()
        cookie = await login(server.base_url, "alice")
        async with await ws_connect(server, "/ws/chat/lobby/", cookie) as ws:
            await recv_until(ws, lambda f: f["type"] == "hello")
            await ws.send(
                json.dumps({"type": "message", "text": "hi @bob, see this", "client_id": "m1"})
            )
            acks = await recv_until(ws, lambda f: f["type"] == "ack")
            seq = acks[-1]["seq"]
        data = await bob_stream.notification(WAIT)
        assert data["url"] == f"/chat/lobby/#seq-{seq}"
        assert "alice" in data["title"] and data["body"] == "hi @bob, see this"
        # bob cannot read the private room: a mention there notifies nobody; nor does the
        # author's mention of herself.
        async with await ws_connect(server, "/ws/chat/secret/", cookie) as ws:
            await recv_until(ws, lambda f: f["type"] == "hello")
            await ws.send(json.dumps({"type": "message", "text": "@bob @alice", "client_id": "m2"}))
            await recv_until(ws, lambda f: f["type"] == "ack")
        await staff.send("alice,bob", "marker")
        assert (await bob_stream.notification(WAIT))["title"] == "marker"
        assert (await alice_stream.notification(WAIT))["title"] == "marker"
        assert [n["title"] for n in alice_stream.notifications()] == ["marker"]


@pytest.mark.postgres
async def test_concurrent_senders_on_postgresql_arrive_once_in_order(
    postgres_env: dict[str, str], start_daphne: Callable[..., DaphneServer]
) -> None:
    # Three processes insert at once (daphne through the admin, two manage.py notify). The
    # advisory lock makes ids visible in id order, which is what lets a stream fill gaps by id.
    run_django_script(_ADD_STAFF, postgres_env, STAFF, TEST_PASSWORD)
    server = start_daphne({**postgres_env, "NOTIFICATIONS_POLL_SECONDS": "0.5"})
    per_sender = 15
    async with (
        session(server, STAFF) as staff,
        session(server, "alice") as alice,
        alice.stream() as stream,
    ):
        await stream.unread()

        async def from_admin() -> None:
            for i in range(per_sender):
                await staff.send("alice,bob", f"admin {i}")

        async def from_cli(name: str) -> None:
            for i in range(0, per_sender, 5):
                await acli_notify(postgres_env, "--user", "alice", "--title", f"{name} {i}")

        await asyncio.gather(from_admin(), from_cli("cli-a"), from_cli("cli-b"))
        expected = per_sender + 2 * len(range(0, per_sender, 5))
        await stream.wait_notifications(expected, 60)
        await asyncio.sleep(1.0)  # a duplicate would arrive by now
        ids = stream.notification_ids()
    assert len(ids) == expected
    assert_unique_increasing(ids)
    url = postgres_env["DATABASE_URL"]
    with psycopg.connect(url.replace("postgres://", "postgresql://")) as conn:
        rows = conn.execute(
            "SELECT n.id FROM notifications_notification n JOIN auth_user u "
            "ON u.id = n.recipient_id WHERE u.username = 'alice' ORDER BY n.id"
        ).fetchall()
    assert ids == [row[0] for row in rows]
