"""End to end: ``GET /chat/<slug>/export/`` and the admin export against a real daphne.

Every test runs on SQLite and on PostgreSQL where the database matters. Exports are compared
with the frames the WebSocket sends for the same messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import re
import socket
import textwrap
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests import servers
from tests.servers import DaphneServer, db_connections

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HTTP_TIMEOUT = 60.0
# OWASP's list of characters that make a spreadsheet read a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

_SCRIPT = textwrap.dedent(
    """
    import django, json, sys
    django.setup()
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from django.db import transaction
    from chat.models import Message, Room

    args = json.loads(sys.argv[1])
    User = get_user_model()
    for spec in args.get("users", []):
        user, _ = User.objects.get_or_create(username=spec["username"])
        user.set_password(spec["password"])
        user.is_staff = spec.get("staff", False)
        user.is_superuser = spec.get("superuser", False)
        user.save()
        for codename in spec.get("perms", []):
            user.user_permissions.add(Permission.objects.get(codename=codename))
    for spec in args.get("messages", []):
        user = User.objects.get(username=spec["username"])
        with transaction.atomic():
            room = Room.objects.select_for_update().get(slug=spec["room"])
            first = room.last_seq + 1
            # A fixed text, or "seeded <seq>" padded with x to "size" characters.
            text, size = spec.get("text"), spec.get("size", 0)
            Message.objects.bulk_create(
                (
                    Message(room=room, seq=seq, user=user,
                            text=text or f"seeded {seq} ".ljust(size, "x"))
                    for seq in range(first, first + spec["count"])
                ),
                batch_size=1000,
            )
            Room.objects.filter(pk=room.pk).update(last_seq=first + spec["count"] - 1)
    print(json.dumps({r.slug: r.pk for r in Room.objects.all()}))
    """
)


def run_script(env: dict[str, str], **args: Any) -> dict[str, int]:
    """Create users and bulk messages directly in the database; return room ids by slug."""
    out = servers.run_django_script(_SCRIPT, env, json.dumps(args), timeout=300)
    return dict(json.loads(out.strip().splitlines()[-1]))


def seed(env: dict[str, str], room: str, count: int, username: str = "carol", **kw: Any) -> None:
    run_script(env, messages=[{"room": room, "count": count, "username": username, **kw}])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """A fresh, prepared database of each kind (SQLite file, PostgreSQL database)."""
    return dict(request.getfixturevalue(f"{request.param}_env"))


def client(server: DaphneServer, cookie: str | None = None, **kw: Any) -> httpx.AsyncClient:
    headers = {"Cookie": cookie} if cookie else {}
    return httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=HTTP_TIMEOUT, **kw)


async def post_messages(
    server: DaphneServer, cookie: str, room: str, texts: list[tuple[str, str]]
) -> None:
    """Send (text, client_id) messages over the WebSocket and wait for each ack."""
    ws = await servers.ws_connect(server, f"/ws/chat/{room}/", cookie)
    try:
        await servers.recv_until(ws, lambda f: f["type"] == "hello", 10)
        for text, client_id in texts:
            await ws.send(json.dumps({"type": "message", "text": text, "client_id": client_id}))
            frames = await servers.recv_until(ws, lambda f: f["type"] in ("ack", "error"), 10)
            answer = next(f for f in frames if f["type"] in ("ack", "error"))
            assert answer["type"] == "ack", answer
    finally:
        await ws.close()


async def websocket_history(server: DaphneServer, cookie: str, room: str) -> list[dict[str, Any]]:
    """Every message of the room as the WebSocket replays it (``after=0``)."""
    ws = await servers.ws_connect(server, f"/ws/chat/{room}/?after=0", cookie)
    try:
        hello = (await servers.recv_until(ws, lambda f: f["type"] == "hello", 10))[-1]
        last = hello["last_seq"]
        frames: list[dict[str, Any]] = []
        while last and (not frames or frames[-1]["seq"] < last):
            batch = await servers.recv_until(ws, lambda f: f["type"] == "message", 10)
            frames += [f for f in batch if f["type"] == "message"]
        return frames
    finally:
        await ws.close()


def ndjson(body: bytes) -> list[dict[str, Any]]:
    text = body.decode("utf-8")
    assert text == "" or text.endswith("\n"), text[-200:]
    return [json.loads(line) for line in text.splitlines()]


def csv_rows(body: bytes) -> list[list[str]]:
    assert body.startswith(b"\xef\xbb\xbf"), body[:20]  # UTF-8 byte order mark for Excel
    rows = list(csv.reader(io.StringIO(body[3:].decode("utf-8"), newline="")))
    assert rows[0] == [
        "seq",
        "id",
        "room",
        "user_id",
        "username",
        "text",
        "client_id",
        "created_at",
        "status",
        "edited_at",
        "deleted",
    ]
    return rows[1:]


def safe(cell: str) -> str:
    """What a neutralised spreadsheet cell must look like (independent of chat.export)."""
    return "'" + cell if cell[:1] in FORMULA_STARTS else cell


def expected_csv(frame: dict[str, Any]) -> list[str]:
    return [
        str(frame["seq"]),
        str(frame["id"]),
        safe(frame["room"]),
        str(frame["user"]["id"]),
        safe(frame["user"]["username"]),
        safe(frame["text"]),
        safe(frame["client_id"] or ""),
        frame["created_at"],
        frame.get("status", ""),
        frame.get("edited_at") or "",
        "true" if frame.get("deleted") else "false",
    ]


AWKWARD = [
    ('she said "hi", then left', "q1"),
    ("line one\nline two\r\nline three", "nl"),
    ("emoji 😀, RTL שלום, CJK 漢字, combining é", "uni"),
    ("=1+2", "f1"),
    ("+SUM(A1:A3)", "f2"),
    ("-2+3", "f3"),
    ("@cmd", "f4"),
    ("\t=tab first", "f5"),
    ("\r=cr first", "f6"),
    ('=HYPERLINK("http://evil.example","click")', "f7"),
    ("plain = not a formula", ""),
]


# --- formats, fields, order --------------------------------------------------------------


async def test_export_is_every_websocket_frame_in_seq_order(
    db_env: dict[str, str], start_daphne: Callable[..., DaphneServer]
) -> None:
    env = {**db_env, "CHAT_EXPORT_PAGE_SIZE": "7"}  # many page boundaries
    run_script(env, users=[{"username": "@mallory", "password": servers.TEST_PASSWORD}])
    seed(env, "lobby", 40)
    seed(env, "lobby", 1, username="@mallory", text="-1 from a formula-looking name")
    seed(env, "secret", 3)  # another room: must not leak into lobby's export
    server = start_daphne(env)
    alice = await servers.login(server.base_url, "alice")
    bob = await servers.login(server.base_url, "bob")
    await post_messages(server, alice, "lobby", AWKWARD)
    await post_messages(server, bob, "lobby", [("from bob", "b1")])
    frames = await websocket_history(server, alice, "lobby")
    assert [f["seq"] for f in frames] == list(range(1, 41 + len(AWKWARD) + 2))

    async with client(server, alice) as http:
        response = await http.get("/chat/lobby/export/", params={"format": "ndjson"})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson; charset=utf-8"
        assert response.headers["x-chat-last-seq"] == str(frames[-1]["seq"])
        assert "lobby-messages.ndjson" in response.headers["content-disposition"]
        assert ndjson(response.content) == frames

        # format defaults to NDJSON
        assert (await http.get("/chat/lobby/export/")).content == response.content

        response = await http.get("/chat/lobby/export/", params={"format": "csv"})
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert "lobby-messages.csv" in response.headers["content-disposition"]
        rows = csv_rows(response.content)
    assert rows == [expected_csv(f) for f in frames]
    by_text = {row[5]: row for row in rows}
    # Quotes, commas, newlines and unicode survive a CSV round trip unchanged.
    for text in [t for t, _ in AWKWARD[:3]]:
        assert text in by_text
    # Formula-looking cells are neutralised: the text, the username, the client_id.
    assert "'=1+2" in by_text and "'\t=tab first" in by_text and "'\r=cr first" in by_text
    mallory = by_text["'-1 from a formula-looking name"]
    assert mallory[4] == "'@mallory"
    # Records end with CRLF; the line breaks inside the quoted text are kept as sent.
    assert b'"line one\nline two\r\nline three"' in response.content
    assert response.content.endswith(b"\r\n")


async def test_after_exports_only_later_messages(
    db_env: dict[str, str], start_daphne: Callable[..., DaphneServer]
) -> None:
    env = {**db_env, "CHAT_EXPORT_PAGE_SIZE": "4"}
    seed(env, "lobby", 25)
    server = start_daphne(env)
    alice = await servers.login(server.base_url, "alice")
    async with client(server, alice) as http:

        async def seqs(after: int, fmt: str = "ndjson") -> list[int]:
            response = await http.get(f"/chat/lobby/export/?format={fmt}&after={after}")
            assert response.status_code == 200, response.text
            if fmt == "csv":
                return [int(row[0]) for row in csv_rows(response.content)]
            return [frame["seq"] for frame in ndjson(response.content)]

        assert await seqs(0) == list(range(1, 26))
        assert await seqs(17) == list(range(18, 26))
        assert await seqs(17, "csv") == list(range(18, 26))
        assert await seqs(24) == [25]
        assert await seqs(25) == []
        assert await seqs(25, "csv") == []  # the header row only
        assert await seqs(10**12) == []


# --- access and parameters -------------------------------------------------------------


async def test_export_access_control_and_bad_parameters(daphne: DaphneServer) -> None:
    alice = await servers.login(daphne.base_url, "alice")  # member of secret
    bob = await servers.login(daphne.base_url, "bob")  # not a member

    def error_code(response: httpx.Response) -> str:
        assert response.headers["content-type"] == "application/json"
        return str(response.json()["error"]["code"])

    async with client(daphne) as anonymous:
        response = await anonymous.get("/chat/lobby/export/")
        assert (response.status_code, error_code(response)) == (401, "unauthenticated")
        response = await anonymous.get("/chat/no-such-room/export/")
        assert response.status_code == 401  # nothing about rooms before logging in
    async with client(daphne, bob) as http:
        response = await http.get("/chat/secret/export/")
        assert (response.status_code, error_code(response)) == (403, "forbidden")
        response = await http.get("/chat/no-such-room/export/")
        assert (response.status_code, error_code(response)) == (404, "not_found")
        assert (await http.get("/chat/lobby/export/")).status_code == 200
    async with client(daphne, alice) as http:
        assert (await http.get("/chat/secret/export/?format=csv")).status_code == 200
        for query in ["format=xml", "format=CSV", "format=", "after=-1", "after=abc", "after=1.5"]:
            response = await http.get(f"/chat/lobby/export/?{query}")
            assert response.status_code == 400, query
            body = response.json()
            assert body["error"]["code"] == "bad_request"
            assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        response = await http.post("/chat/lobby/export/")
        assert response.status_code in (403, 405)  # CSRF first, or method not allowed
        head = await http.head("/chat/lobby/export/")
        assert head.status_code == 405


# --- disconnects -------------------------------------------------------------------------


async def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout:g} s: {what}")
        await asyncio.sleep(0.2)


async def _steadily(check: Callable[[], bool], what: str, samples: int = 5) -> None:
    """Wait until ``check`` holds for ``samples`` samples in a row, 0.2 s apart."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60.0
    streak = 0
    while streak < samples:
        streak = streak + 1 if check() else 0
        if loop.time() > deadline:
            raise AssertionError(f"not steadily true within 60 s: {what}")
        await asyncio.sleep(0.2)


EXPORT_ROWS = 8000
ROW_TEXT_CHARS = 4000  # 8000 rows of 4 KB: a 32 MB export, far more than the socket buffers
# Most an export may run ahead of its reader: the server's socket buffer (at most 4 MiB,
# net.ipv4.tcp_wmem), Twisted's 64 KiB, one page of about 1 MiB and the client's small buffer.
MAX_AHEAD_BYTES = 8 * 1024 * 1024


async def test_a_client_that_stops_reading_then_leaves_stops_the_export(
    db_env: dict[str, str], start_daphne: Callable[..., DaphneServer]
) -> None:
    seed(db_env, "lobby", EXPORT_ROWS, size=ROW_TEXT_CHARS)
    server = start_daphne(db_env)
    alice = await servers.login(server.base_url, "alice")
    # A small receive buffer: the bytes in flight are the server's doing, not the kernel's.
    small_buffer = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)]
    transport = httpx.AsyncHTTPTransport(socket_options=small_buffer)
    async with client(server, alice, transport=transport) as http:
        async with http.stream("GET", "/chat/lobby/export/?format=ndjson") as response:
            assert response.status_code == 200
            # Keep the iterator: breaking out of ``async for`` would let it be collected,
            # which closes the connection, and this test is about a client that stays.
            chunks = response.aiter_raw()
            received = 0
            while received < 256 * 1024:
                received += len(await anext(chunks))
            # The reader stalls. With backpressure the export stalls too, and while it waits
            # for the client it holds no database connection.
            await _steadily(
                lambda: db_connections(server, db_env) == 0,
                "the stalled export holds no database connection",
            )
            # Time for an export without backpressure to run ahead (and finish).
            await asyncio.sleep(2)
            log = server.log_tail(100_000)
            assert "Export started: user=" in log
            assert "Export complete" not in log, "the export did not wait for its reader"
            assert "Export aborted" not in log, "the client is still connected"
    # The client has closed the connection: the export must stop, and say so.
    await _until(lambda: "Export aborted" in server.log_tail(100_000), "Export aborted logged")
    match = re.search(r"Export aborted: user=\d+ room=lobby rows=(\d+)", server.log_tail(100_000))
    assert match is not None
    rows = int(match.group(1))
    assert 0 < rows < EXPORT_ROWS
    assert rows * ROW_TEXT_CHARS - received < MAX_AHEAD_BYTES, (rows, received)
    await _steadily(
        lambda: db_connections(server, db_env) == 0,
        "no database connection after the client left",
    )
    # The server is fine afterwards.
    async with client(server, alice) as http:
        response = await http.get(f"/chat/lobby/export/?after={EXPORT_ROWS - 2}")
        assert [f["seq"] for f in ndjson(response.content)] == [EXPORT_ROWS - 1, EXPORT_ROWS]


# --- admin -------------------------------------------------------------------------------


async def _admin_action(
    server: DaphneServer, cookie: str, action: str, room_ids: list[int]
) -> httpx.Response:
    async with client(server, cookie) as http:
        page = await http.get("/admin/chat/room/")
        assert page.status_code == 200, page.status_code
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token is not None
        return await http.post(
            "/admin/chat/room/",
            data={
                "action": action,
                "_selected_action": [str(pk) for pk in room_ids],
                "index": "0",
                "csrfmiddlewaretoken": token.group(1),
            },
            headers={"Referer": f"{server.base_url}/admin/chat/room/"},
        )


async def test_admin_action_streams_the_selected_rooms(
    sqlite_env: dict[str, str], start_daphne: Callable[..., DaphneServer]
) -> None:
    rooms = run_script(
        sqlite_env,
        users=[
            {
                "username": "root",
                "password": servers.TEST_PASSWORD,
                "staff": True,
                "superuser": True,
            },
            {
                "username": "clerk",
                "password": servers.TEST_PASSWORD,
                "staff": True,
                "perms": ["view_room"],
            },
        ],
        messages=[
            {"room": "lobby", "count": 5, "username": "carol"},
            {"room": "secret", "count": 3, "username": "alice", "text": "=secret formula"},
        ],
    )
    server = start_daphne({**sqlite_env, "CHAT_EXPORT_PAGE_SIZE": "2"})
    root = await servers.login(server.base_url, "root")
    selected = [rooms["secret"], rooms["lobby"]]

    response = await _admin_action(server, root, "export_messages_csv", selected)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert "attachment" in response.headers["content-disposition"]
    rows = csv_rows(response.content)
    # Rooms in slug order, each in seq order, with the room column telling them apart.
    assert [(r[2], int(r[0])) for r in rows] == [("lobby", s) for s in range(1, 6)] + [
        ("secret", s) for s in range(1, 4)
    ]
    assert {r[5] for r in rows if r[2] == "secret"} == {"'=secret formula"}

    response = await _admin_action(server, root, "export_messages_ndjson", [rooms["lobby"]])
    assert response.status_code == 200
    frames = ndjson(response.content)
    assert frames == await websocket_history(server, root, "lobby")

    # Viewing rooms is not enough: exporting needs the permission to view messages.
    clerk = await servers.login(server.base_url, "clerk")
    response = await _admin_action(server, clerk, "export_messages_csv", selected)
    assert "text/csv" not in response.headers.get("content-type", "")
    assert "Export complete: admin user=" in server.log_tail(100_000)


# --- bounds: exports at once, connections per export ---------------------------------------


async def test_a_user_holding_stalled_exports_is_refused_more_and_others_are_not(
    sqlite_env: dict[str, str], start_daphne: Callable[..., DaphneServer]
) -> None:
    # The attack: open export after export and read none of them, each holding a thread (and
    # with no cap a database connection) on the server.
    seed(sqlite_env, "lobby", 2000, size=ROW_TEXT_CHARS)  # 8 MB: far more than buffers hold
    servers.create_superuser(sqlite_env, "root", servers.TEST_PASSWORD)
    server = start_daphne({**sqlite_env, "CHAT_EXPORT_MAX_CONCURRENT_PER_USER": "2"})
    alice = await servers.login(server.base_url, "alice")
    async with client(server, alice) as http:  # the server's own threads, started once
        assert (await http.get("/chat/lobby/export/?after=1999")).status_code == 200
    threads_before = servers.server_threads(server)
    small_buffer = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)]

    async def stall(stack: contextlib.AsyncExitStack, cookie: str, path: str) -> None:
        """Start a download and read none of it (a small receive buffer: it stalls soon)."""
        transport = httpx.AsyncHTTPTransport(socket_options=small_buffer)
        http = await stack.enter_async_context(client(server, cookie, transport=transport))
        response = await stack.enter_async_context(http.stream("GET", path))
        assert response.status_code == 200

    async with contextlib.AsyncExitStack() as stack:
        held = 2
        for _ in range(held):
            await stall(stack, alice, "/chat/lobby/export/?format=csv")
        # One thread per export, its reader: the request's own thread ended as the body began.
        threads = servers.server_threads(server) - threads_before
        assert threads <= held, f"{threads} threads for {held} stalled exports"
        async with client(server, alice) as http:
            refused = await http.get("/chat/lobby/export/?format=ndjson")
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_exports"
            assert "At most 2 exports" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) > 0
        # Another user is not affected.
        root = await servers.login(server.base_url, "root")
        async with client(server, root) as http:
            response = await http.get(f"/chat/lobby/export/?after={1990}")
            assert [f["seq"] for f in ndjson(response.content)] == list(range(1991, 2001))
            # Staff exporting from the admin count against their own cap: at it, the change
            # list says why instead of starting a download.
            for _ in range(2):
                await stall(stack, root, "/chat/lobby/export/")
        rooms = run_script(sqlite_env)
        refused_admin = await _admin_action(server, root, "export_messages_csv", [rooms["lobby"]])
        assert "text/csv" not in refused_admin.headers.get("content-type", "")
        assert refused_admin.status_code == 302
        # The message travels in a cookie (Django's message storage) to the next page.
        notice = refused_admin.cookies.get("messages")
        assert notice is not None
        async with client(server, f"{root}; messages={notice}") as http:
            page = await http.get(refused_admin.headers["location"])
            assert "At most 2 exports at a time per user" in page.text

    # The stalled downloads are gone: their places are free again.
    async def alice_can_export() -> bool:
        async with client(server, alice) as http:
            response = await http.get("/chat/lobby/export/?after=1999")
            return response.status_code == 200

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not await alice_can_export():
        assert loop.time() < deadline, "the leaving clients' export places were not freed"
        await asyncio.sleep(0.2)
    # Admin downloads give their places back too: more of them in a row than the cap.
    for _ in range(3):
        response = await _admin_action(server, root, "export_messages_csv", [rooms["lobby"]])
        assert response.headers.get("content-type") == "text/csv; charset=utf-8"
        assert len(csv_rows(response.content)) == 2000


def _postgres_sessions(env: dict[str, str]) -> int:
    """Connections ever opened to the test database (PostgreSQL's cumulative counter)."""
    import psycopg

    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.postgres
async def test_an_export_read_as_fast_as_it_comes_reuses_its_connection(
    postgres_env: dict[str, str], start_daphne: Callable[..., DaphneServer]
) -> None:
    rows, page_size = 3000, 20
    seed(postgres_env, "lobby", rows)
    server = start_daphne({**postgres_env, "CHAT_EXPORT_PAGE_SIZE": str(page_size)})
    alice = await servers.login(server.base_url, "alice")
    await _steadily(lambda: db_connections(server, postgres_env) == 0, "an idle server")
    before = _postgres_sessions(postgres_env)
    async with client(server, alice) as http:
        response = await http.get("/chat/lobby/export/?format=ndjson")
    assert [f["seq"] for f in ndjson(response.content)] == list(range(1, rows + 1))
    await _steadily(
        lambda: db_connections(server, postgres_env) == 0, "no connection after the export"
    )
    # PostgreSQL counts a session when its backend reports, at the latest when it exits.
    opened = _postgres_sessions(postgres_env) - before
    pages = rows // page_size
    # A connection per page would be 150 sessions; a few are the request's own and those
    # counted by the checks above. A reconnect after a pause of the loaded test machine is
    # allowed for, not one per page.
    assert opened < pages // 5, (opened, pages)
