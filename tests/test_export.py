"""In-process tests of the export encoders (pure) and of rows-to-frames (one database)."""

from __future__ import annotations

import asyncio
import csv
import gc
import io
import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from django.contrib.auth.models import User

from chat import export, protocol
from chat.api import BadParameter
from chat.models import Message, Room


def frame(seq: int = 1, text: str = "hi", username: str = "alice", **extra: Any) -> dict[str, Any]:
    base = {
        "type": "message",
        "seq": seq,
        "id": 100 + seq,
        "room": "lobby",
        "user": {"id": 7, "username": username},
        "text": text,
        "client_id": None,
        "created_at": "2026-11-21T06:00:00.123456+00:00",
    }
    return {**base, **extra}


def parse_csv(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


# --- CSV ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=1+2", "'=1+2"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tTAB", "'\tTAB"),
        ("\rCR", "'\rCR"),
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("a=b", "a=b"),
        (" =1", " =1"),
        ("'quoted", "'quoted"),
        ("", ""),
        ("héllo", "héllo"),
    ],
)
def test_neutralise_cell(value: str, expected: str) -> None:
    assert export.neutralise_cell(value) == expected


def test_csv_header_has_bom_and_columns() -> None:
    header = export.csv_header()
    assert header.startswith("\ufeff".encode())
    assert header.endswith(b"\r\n")
    assert parse_csv(header[3:]) == [list(export.CSV_COLUMNS)]


def test_csv_row_fields_follow_the_frame() -> None:
    data = export.encode_csv([frame(seq=5, text="hi", client_id="c-1")])
    assert data == b"5,105,lobby,7,alice,hi,c-1,2026-11-21T06:00:00.123456+00:00,,,false\r\n"


def test_csv_status_of_an_assistant_reply() -> None:
    (row,) = parse_csv(export.encode_csv([frame(status="stopped")]))
    assert row[export.CSV_COLUMNS.index("status")] == "stopped"


def test_csv_null_client_id_is_an_empty_cell() -> None:
    (row,) = parse_csv(export.encode_csv([frame()]))
    assert row[export.CSV_COLUMNS.index("client_id")] == ""


@pytest.mark.parametrize(
    "text",
    [
        'she said "hi"',
        "a,b,c",
        "line one\nline two",
        "windows\r\nline",
        'all "of", them\n\r\n',
        "emoji 😀 and RTL שלום and CJK 漢字",
        "\u2028separator\u2029",
    ],
)
def test_csv_round_trips_awkward_text(text: str) -> None:
    data = export.encode_csv([frame(text=text), frame(seq=2, text="after")])
    rows = parse_csv(data)
    assert [r[export.CSV_COLUMNS.index("text")] for r in rows] == [text, "after"]
    assert len(rows) == 2


def test_csv_neutralises_every_text_cell() -> None:
    evil = frame(text="=cmd|' /C calc'!A0", username="@mallory", client_id="+1", room="-room")
    (row,) = parse_csv(export.encode_csv([evil]))
    cells = dict(zip(export.CSV_COLUMNS, row, strict=True))
    assert cells["text"] == "'=cmd|' /C calc'!A0"
    assert cells["username"] == "'@mallory"
    assert cells["client_id"] == "'+1"
    assert cells["room"] == "'-room"
    # Numbers are never prefixed: they cannot start with a formula character.
    assert cells["seq"] == "1"


def test_csv_quotes_fields_that_need_it_rfc4180() -> None:
    data = export.encode_csv([frame(text='a "b", c\nd')])
    assert b'"a ""b"", c\nd"' in data
    assert data.endswith(b"\r\n")


CSV_AWKWARD = [
    "",
    " ",
    "plain",
    "a,b",
    'say "hi"',
    '"',
    "cr\ronly",
    "lf\nonly",
    "crlf\r\n",
    "tab\tx",
    "=SUM(1)",
    "'",
    "😀 ✓ 東京",
    "\u2028\x85",
    ' ,"\r\n"" ',
]


@pytest.mark.parametrize("value", CSV_AWKWARD)
def test_csv_field_is_what_csv_writer_writes(value: str) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(["x", value, "y"])
    assert f"x,{export.csv_field(value)},y\r\n" == buffer.getvalue()


def test_csv_lines_of_raw_rows_are_encode_csv_of_their_frames() -> None:
    created = datetime(2026, 11, 21, 6, 0, 0, 123456, tzinfo=UTC)
    rows = [
        # ROW_FIELDS: seq, id, text, client_id, created_at, status, edited_at, deleted,
        # update_seq, user_id
        (n, 100 + n, text, text, created, status, edited, deleted, update_seq, n % 2)
        for n, text in enumerate(CSV_AWKWARD, 1)
        for status, edited, deleted, update_seq in [
            ("", None, False, 0),
            ("stopped", created, True, 2),
            ("", None, True, 3),
        ]
    ]
    usernames = {0: 'we,"ird', 1: "@alice"}
    iso = datetime.isoformat
    frames = export.message_frames(rows, "-room", usernames, iso)
    assert export.csv_lines(rows, "-room", usernames, iso) == export.encode_csv(frames)


# --- NDJSON ------------------------------------------------------------------------------


def test_ndjson_lines_are_the_websocket_frames() -> None:
    frames = [frame(seq=1, text="a\nb"), frame(seq=2, text="😀 \u2028", client_id="x")]
    data = export.encode_ndjson(frames)
    lines = data.decode("utf-8").split("\n")
    assert lines[-1] == ""  # every line ends with \n, the last one too
    assert [json.loads(line) for line in lines[:-1]] == frames
    assert lines[0] == protocol.encode(frames[0])


def test_ndjson_keeps_unicode_unescaped() -> None:
    assert "😀".encode() in export.encode_ndjson([frame(text="😀")])


# Characters that str.splitlines(), many line readers and pre-ES2019 JavaScript take for line
# breaks, and that JSON allows raw inside strings.
LINE_SEPARATORS = ("\u0085", "\u2028", "\u2029")


def test_ndjson_escapes_what_line_readers_take_for_line_breaks() -> None:
    frames = [frame(seq=n, text=f"a{sep}b{sep}") for n, sep in enumerate(LINE_SEPARATORS, 1)]
    data = export.encode_ndjson(frames)
    for sep in LINE_SEPARATORS:
        assert sep.encode() not in data
        assert f"\\u{ord(sep):04x}".encode() in data
    lines = data.decode("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == frames


@pytest.mark.django_db(transaction=True)
async def test_ndjson_download_has_one_line_per_message() -> None:
    # The real bytes of GET /chat/<slug>/export/, read line by line as a program would.
    from django.test import AsyncClient

    user = await User.objects.acreate(username="alice")
    room = await Room.objects.acreate(slug="lobby", title="Lobby", last_seq=4)
    texts = [f"before{sep}after" for sep in LINE_SEPARATORS] + ["\u2028\u2029\x85"]
    for seq, text in enumerate(texts, 1):
        await Message.objects.acreate(room=room, seq=seq, user=user, text=text)
    client = AsyncClient()
    await client.aforce_login(user)
    response: Any = await client.get("/chat/lobby/export/?format=ndjson")
    assert response.status_code == 200
    body = b"".join([chunk async for chunk in response.streaming_content])
    assert not any(sep.encode() in body for sep in LINE_SEPARATORS)
    lines = io.TextIOWrapper(io.BytesIO(body), encoding="utf-8").read().splitlines()
    assert [json.loads(line)["text"] for line in lines] == texts


def test_ndjson_of_nothing_is_empty() -> None:
    assert export.encode_ndjson([]) == b""
    assert export.FORMATS["ndjson"].header() == b""


# --- parameters ----------------------------------------------------------------------------


def test_parse_format() -> None:
    assert export.parse_format(None).name == "ndjson"
    assert export.parse_format("csv").name == "csv"
    for bad in ["", "CSV", "json", "xlsx"]:
        with pytest.raises(BadParameter):
            export.parse_format(bad)


# --- rows to frames ------------------------------------------------------------------------


def _every_kind_of_message(room: Room, user: User) -> None:
    """Plain, with a client_id, an assistant status, edited, deleted, awkward text and times."""
    created = datetime(2026, 11, 21, 6, 0, 0, 123456, tzinfo=UTC)
    on_the_second = datetime(2026, 11, 21, 6, 0, 1, tzinfo=UTC)  # isoformat without .ffffff
    kinds: list[dict[str, Any]] = [
        {},
        {"client_id": "cid-2"},
        {"client_id": "asst-1", "status": "stopped"},
        {"text": "edited ✓", "edited_at": on_the_second, "update_seq": 1},
        {"text": "", "edited_at": created, "deleted": True, "update_seq": 2},
        {"text": '=1+2 \u2028 \u0085 \u2029 "q", \r\n', "client_id": "@x"},
        {"created_at": on_the_second, "update_seq": 3},  # changed, then changed back
    ]
    for seq, kind in enumerate(kinds, 1):
        fields = {"text": f"t{seq} ✓", **kind}
        when = fields.pop("created_at", created)
        message = Message.objects.create(room=room, seq=seq, user=user, **fields)
        Message.objects.filter(pk=message.pk).update(created_at=when)


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_read_page_is_the_encoding_of_message_frame_of_each_instance(fmt: str) -> None:
    # The raw-row fast path must give the very bytes of the frames the WebSocket sends.
    user = User.objects.create_user(username="zoë", password="x")
    room = Room.objects.create(slug="lobby", title="Lobby")
    _every_kind_of_message(room, user)
    instances = Message.objects.select_related("user").order_by("seq")
    frames = [protocol.message_frame(m, room.slug, m.user) for m in instances]
    assert frames[2]["status"] == "stopped" and "status" not in frames[0]
    assert frames[4]["deleted"] is True and frames[3]["edited_at"].endswith(":01+00:00")
    snapshot = export.RoomSnapshot(room.pk, room.slug, upto=len(frames))
    page = export.read_page(snapshot, 0, 100, export.FORMATS[fmt])
    assert page.rows == len(frames)
    assert page.last_seq == len(frames)
    reference = export.FORMATS[fmt].encode(frames)
    assert page.data == reference
    if fmt == "ndjson":
        assert page.data == "".join(export.ndjson_line(f) for f in frames).encode()


@pytest.mark.django_db
def test_usernames_are_read_once_per_author_and_the_cache_is_bounded(
    django_assert_num_queries: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "sqlite_lines_sql", lambda fmt: None)  # the Python path's cache
    users = [User.objects.create_user(username=f"u{n}", password="x") for n in range(3)]
    room = Room.objects.create(slug="r", title="R")
    Message.objects.bulk_create(
        Message(room=room, seq=s, user=users[s % 3], text=str(s)) for s in range(1, 13)
    )
    snapshot = export.RoomSnapshot(room.pk, room.slug, upto=12)
    cache = export.UsernameCache(max_entries=3)
    ndjson = export.FORMATS["ndjson"]
    with django_assert_num_queries(2):  # the page, then the three usernames
        export.read_page(snapshot, 0, 6, ndjson, cache)
    with django_assert_num_queries(1):  # the page: every author is cached
        page = export.read_page(snapshot, 6, 6, ndjson, cache)
    assert [json.loads(line)["user"]["username"] for line in page.data.splitlines()] == [
        f"u{s % 3}" for s in range(7, 13)
    ]
    # A fourth author would overflow the bound: the cache starts again.
    extra = User.objects.create_user(username="u3", password="x")
    assert cache.fill([extra.pk]) == {extra.pk: "u3"}


def test_iso_datetimes_from_sqlite_text_equal_isoformat() -> None:
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("SQLite stores datetimes as text")
    iso = export.iso_datetimes(connection)
    for value in [
        datetime(2026, 11, 21, 6, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 21, 6, 0, 0, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    ]:
        # How Django's SQLite backend writes an aware datetime (naive, in UTC).
        stored = connection.ops.adapt_datetimefield_value(value)
        assert iso(stored) == value.isoformat()
    # Text that other code wrote in another ISO form goes through parse_datetime.
    assert iso("2026-11-21T06:00:00.5") == "2026-11-21T06:00:00.500000+00:00"


@pytest.mark.django_db
def test_read_page_respects_after_upto_and_limit() -> None:
    user = User.objects.create_user(username="u", password="x")
    room = Room.objects.create(slug="r", title="R")
    other = Room.objects.create(slug="o", title="O")
    Message.objects.bulk_create(
        [Message(room=room, seq=s, user=user, text=str(s)) for s in range(1, 11)]
        + [Message(room=other, seq=s, user=user, text="other") for s in range(1, 11)]
    )
    snapshot = export.RoomSnapshot(room.pk, room.slug, upto=8)
    ndjson = export.FORMATS["ndjson"]

    def seqs(page: export.Page) -> list[int]:
        return [json.loads(line)["seq"] for line in page.data.decode().splitlines()]

    assert seqs(export.read_page(snapshot, 2, 3, ndjson)) == [3, 4, 5]
    assert seqs(export.read_page(snapshot, 5, 100, ndjson)) == [6, 7, 8]
    empty = export.read_page(snapshot, 8, 100, ndjson)
    assert (empty.rows, empty.data, empty.last_seq) == (0, b"", 8)


@pytest.mark.django_db(transaction=True)
async def test_stream_export_pages_rooms_in_order_and_logs_the_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def setup() -> list[export.RoomSnapshot]:
        user = User.objects.create_user(username="u", password="x")
        rooms = [Room.objects.create(slug=s, title=s) for s in ("a", "b")]
        for room in rooms:
            Message.objects.bulk_create(
                Message(room=room, seq=s, user=user, text=f"{room.slug}{s}") for s in range(1, 8)
            )
        return [export.RoomSnapshot(r.pk, r.slug, upto=7) for r in rooms]

    from asgiref.sync import sync_to_async

    rooms = await sync_to_async(setup)()
    caplog.set_level("INFO", logger="chat.export")
    stream = export.stream_export(
        rooms, export.FORMATS["csv"], after=2, page_size=2, audit="test-audit"
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0] == export.csv_header()
    # 5 messages per room in pages of 2: 3 pages per room.
    assert len(chunks) == 1 + 3 + 3
    rows = parse_csv(b"".join(chunks)[3:])[1:]
    assert [r[5] for r in rows] == [f"{slug}{s}" for slug in "ab" for s in range(3, 8)]
    assert "Export complete: test-audit rows=10" in caplog.text

    caplog.clear()
    stream = export.stream_export(rooms, export.FORMATS["ndjson"], page_size=2, audit="early")
    assert await anext(stream) == b""
    assert (await anext(stream)).count(b"\n") == 2
    await stream.aclose()
    assert "Export aborted: early rows=2" in caplog.text


class _RecordedReads:
    """read_page and release_connections stand-ins: what ran on the export's thread, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, read_seconds: float = 0.0) -> None:
        self.events: list[tuple[str, str]] = []
        self.read_seconds = read_seconds
        monkeypatch.setattr(export, "read_page", self.read_page)
        monkeypatch.setattr(export, "release_connections", self.release)

    def read_page(self, room: Any, after: int, limit: int, *args: Any) -> export.Page:
        time.sleep(self.read_seconds)
        self.events.append(("read", threading.current_thread().name))
        return export.Page(b"x", 1, after + 1)

    def release(self, ending: bool = False) -> None:
        self.events.append(("end" if ending else "release", threading.current_thread().name))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


ROOM = export.RoomSnapshot(1, "lobby", 100)


async def test_reads_in_quick_succession_share_one_connection_and_a_pause_lets_it_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    recorded = _RecordedReads(monkeypatch)
    reader = export.PageReader(export.FORMATS["ndjson"])
    for after in range(5):
        await reader.read(ROOM, after, 1)
    assert recorded.kinds() == ["read"] * 5  # no close between back-to-back pages
    await asyncio.sleep(export.CONNECTION_LINGER_SECONDS * 4)
    assert recorded.kinds() == ["read"] * 5 + ["release"]  # a reader that pauses holds none
    await reader.read(ROOM, 5, 1)
    reader.close()
    reader.close()  # idempotent
    await asyncio.sleep(export.CONNECTION_LINGER_SECONDS * 4)
    # The end closes every connection and no lingering release runs after it.
    assert recorded.kinds() == ["read"] * 5 + ["release", "read", "end"]
    threads = {thread for _, thread in recorded.events}
    assert len(threads) == 1 and threads.pop().startswith("chat-export")


async def test_closing_during_a_read_closes_the_connection_after_that_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    recorded = _RecordedReads(monkeypatch, read_seconds=0.2)
    reader = export.PageReader(export.FORMATS["csv"])
    pending = asyncio.ensure_future(reader.read(ROOM, 0, 1))
    await asyncio.sleep(0.05)  # the read is running on the thread
    pending.cancel()
    reader.close()
    for _ in range(50):
        if recorded.kinds() == ["read", "end"]:
            break
        await asyncio.sleep(0.02)
    assert recorded.kinds() == ["read", "end"]


async def test_an_export_gives_its_place_back_when_it_ends_or_never_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    from chat import quotas

    _RecordedReads(monkeypatch)
    room = export.RoomSnapshot(1, "lobby", 3)

    async def place() -> Any:
        lease = await quotas.exports.acquire(42, f"holder-{id(object())}")
        assert lease is not None
        return lease

    async def settled() -> int:
        for _ in range(3):
            await asyncio.sleep(0)
        return quotas.exports.held_here(42)

    def response(lease: Any) -> Any:
        return export.export_response(
            [room], export.FORMATS["ndjson"], filename="f", page_size=10, audit="t", lease=lease
        )

    # Read to the end: the generator's finally gives the place back.
    done = response(await place())
    assert await settled() == 1
    assert b"".join([chunk async for chunk in done]) == b"xxx"
    assert await settled() == 0
    # Dropped before the body started (the client left first): no finally ever runs, the
    # generator's collection gives it back.
    dropped = response(await place())
    assert await settled() == 1
    del dropped
    gc.collect()
    assert await settled() == 0


def test_pages_shrink_when_rows_are_long() -> None:
    def page(rows: int, size: int) -> export.Page:
        return export.Page(b"x" * size, rows, rows)

    # Short rows: the configured page size.
    assert export.next_page_size(page(100, 100 * 200), 2000) == 2000
    # 4 KB rows: about TARGET_CHUNK_BYTES per page.
    assert export.next_page_size(page(100, 100 * 4096), 2000) == export.TARGET_CHUNK_BYTES // 4096
    # Huge rows: never below one row.
    assert export.next_page_size(page(1, 10 * export.TARGET_CHUNK_BYTES), 2000) == 1


def test_line_break_escapes_only_the_line_breaks() -> None:
    # "è" is c3 a8: it ends in the last byte of U+2028's encoding (e2 80 a8), which the
    # escape looks for first; it must be left alone, next to a real U+2028 or not.
    assert export.escape_line_breaks("è".encode()) == "è".encode()
    assert export.escape_line_breaks("è\u2028è\x85".encode()) == "è\\u2028è\\u0085".encode()
    assert export.escape_line_breaks(b"plain ascii") == b"plain ascii"


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_sqlite_built_lines_are_the_python_paths_bytes(
    monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    # SQLite writes the lines itself (chat/export.py): every byte must be what the Python
    # path (the WebSocket frames, their CSV rows) writes, for awkward texts, names and every
    # kind of message; a page SQLite cannot write falls back to Python as a whole.
    from django.db import connection

    sql = export.sqlite_lines_sql(fmt)
    assert sql is not None, "the test database takes the SQL path"
    users = [
        User.objects.create_user(username=name, password="x")
        for name in ('we"i\\rd', "zoë 😀", "\u2028x", "=cmd,x", "-1")
    ]
    texts = [*CSV_AWKWARD, *LINE_SEPARATORS, "\x1f\x7f", "</script>", "\\u0041", "50% %s %d %%"]

    def room_of(slug: str, texts: list[str]) -> export.RoomSnapshot:
        room = Room.objects.create(slug=slug, title=slug)
        Message.objects.bulk_create(
            Message(
                room=room,
                seq=n,
                user=users[n % len(users)],
                text=text,
                client_id="" if n % 2 else f"c-{text[:10]}" if n % 4 else f"={text[:6]}",
                status="stopped" if n % 5 == 0 else "",
            )
            for n, text in enumerate(texts, 1)
        )
        return export.RoomSnapshot(room.pk, room.slug, upto=len(texts))

    # A slug that starts like a formula (its CSV cell is made once, in Python).
    lobby = room_of("-lobby", texts)
    kinds_room = Room.objects.create(slug="kinds", title="Kinds")
    _every_kind_of_message(kinds_room, users[1])  # edited, deleted, stopped, on the second
    kinds = export.RoomSnapshot(kinds_room.pk, "kinds", upto=7)
    encoding = export.FORMATS[fmt]

    def by_sql(snapshot: export.RoomSnapshot, after: int, limit: int) -> bool:
        """Whether SQLite writes every line of this page (else it goes the Python way)."""
        lines = export.fetch_lines(snapshot, after, limit, fmt, sql)
        return lines.lines == lines.rows

    def same_bytes(snapshot: export.RoomSnapshot, after: int, limit: int) -> export.Page:
        page = export.read_page(snapshot, after, limit, encoding)
        with monkeypatch.context() as patched:
            patched.setattr(export, "sqlite_lines_sql", lambda fmt: None)
            python = export.read_page(snapshot, after, limit, encoding)
        lines = zip(page.data.split(b"\n"), python.data.split(b"\n"), strict=False)
        differing = [(a, b) for a, b in lines if a != b][:3]
        assert page == python, (snapshot.slug, after, limit, differing)
        return page

    for snapshot in (lobby, kinds):
        upto = snapshot.upto
        for after, limit in ((0, 1000), (0, 7), (7, 7), (upto - 1, 5), (upto, 5)):
            assert by_sql(snapshot, after, limit), (snapshot.slug, after, limit)
            same_bytes(snapshot, after, limit)
    # A NUL: JSON escapes it, so NDJSON keeps the SQL path; printf would stop at it in a CSV
    # cell, so that page of CSV goes the Python way.
    nul = room_of("nul", ["before", "\x00nul", "after"])
    assert by_sql(nul, 0, 10) is (fmt == "ndjson")
    assert b"\x00nul" in same_bytes(nul, 0, 10).data or fmt == "ndjson"

    def set_time(snapshot: export.RoomSnapshot, column: str, seq: int, value: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                # column is one of two literals here; the values are parameters.
                f"UPDATE chat_message SET {column} = %s WHERE room_id = %s AND seq = %s",  # noqa: S608
                [value, snapshot.id, seq],
            )

    # What the SQL cannot turn into isoformat by string edits: that page goes the Python way.
    set_time(lobby, "created_at", 3, "2026-11-21 06:00:00.5")
    assert not by_sql(lobby, 0, 1000)
    assert b"2026-11-21T06:00:00.500000+00:00" in same_bytes(lobby, 0, 1000).data
    # The same for the time of a change (the edited message, seq 4 of kinds).
    set_time(kinds, "edited_at", 4, "2026-11-21 07:00:00.25")
    assert not by_sql(kinds, 0, 1000)
    assert b"2026-11-21T07:00:00.250000+00:00" in same_bytes(kinds, 0, 1000).data
    # A value of the right shape written by hand, with a quote in it: JSON still escapes it.
    quoted = room_of("quoted", ["one"])
    set_time(quoted, "created_at", 1, '2026-11-21 06:00:0"')
    assert by_sql(quoted, 0, 10)
    same_bytes(quoted, 0, 10)
