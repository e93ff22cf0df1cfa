"""Message exports: NDJSON and CSV encoders (pure) and the keyset-paged stream behind them.

An export reads ``seq > last`` pages of raw rows in seq order, one query per page, so memory
does not depend on the room's size: no model instances, no server-side cursor (PostgreSQL
materialises a WITH HOLD cursor's whole result first in async code). Each page is read and
encoded in one hop to the export's own thread (``PageReader``), which keeps its database
connection from one page to the next while the client keeps up and lets it go once no read
has followed for ``CONNECTION_LINGER_SECONDS``: a slow reader holds no connection while it
drains a page, and an ended or cancelled export none at all. The next page is read while the
current one is sent; ``chat.backpressure`` makes that sending wait for the client under
daphne, so at most about two pages are held per export.

Rows per second is the figure that matters here (docs/benchmarks.md), so a page skips what
costs per row without changing a byte: the ORM writes the SQL but a plain cursor runs it (no
converters; SQLite datetimes are read as text and become isoformat by string edits), each
author's username is read once per export (``UsernameCache``) instead of joined per row,
frames are built from tuples and encoded in one pass per page, and CSV lines are formatted
directly. On SQLite every line is written by SQLite itself, a page at a time
(``sqlite_lines_sql``: the same bytes, checked; the Python path where it cannot be). Every
row still equals
``protocol.message_frame``: an NDJSON line is the WebSocket
message frame (the same bytes but for three escaped line separators); a CSV row is the same
fields, flattened. tests/test_export.py pins both; docs/protocol.md describes them.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import sqlite3
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import close_old_connections, connections, router
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, TextField
from django.db.models.functions import Cast
from django.http import StreamingHttpResponse
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from realtime_kit.leases import Lease
from realtime_kit.threads import release_request_thread

from . import protocol
from .api import BadParameter
from .conf import app_settings
from .models import Message

logger = logging.getLogger(__name__)

CSV_COLUMNS = (
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
)
# Spreadsheets evaluate a cell that starts with one of these (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# What makes csv.writer (QUOTE_MINIMAL, lineterminator CRLF) quote a field.
_NEEDS_QUOTES = re.compile(r'[,"\r\n]').search
# Excel reads a CSV file as UTF-8 only when it starts with a byte order mark.
UTF8_BOM = "\ufeff"
# JSON leaves NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR raw inside strings, but Python's
# str.splitlines(), editors and other line readers break lines at them, and JavaScript before
# ES2019 refuses them in a string literal (JSON pasted into a script): an NDJSON line must
# hold no line break but its final \n. (The other characters splitlines() breaks at are
# control characters, which JSON escapes anyway.)
LINE_BREAKS_TO_ESCAPE = {ord(c): f"\\u{ord(c):04x}" for c in "\u0085\u2028\u2029"}
LINE_BREAK_BYTES = tuple((chr(c).encode(), e.encode()) for c, e in LINE_BREAKS_TO_ESCAPE.items())
# Pages shrink below CHAT_EXPORT_PAGE_SIZE rows when texts are long, so that one page (the
# rows, then the encoded chunk) stays near this size: 2000 texts of 4000 emoji would be 32 MB.
TARGET_CHUNK_BYTES = 1024 * 1024
# The first page is small: its rows reach the client quickly, and it measures the row size.
FIRST_PAGE_ROWS = 100
# How long an export's database connection stays open after a page for the next one. A client
# that keeps up asks again within milliseconds and every page shares one connection (a new
# SQLite connection per page cost ~12 % of the export's rows/s, measured in benchmarks.md);
# one that takes longer drains its page with no connection held, and a reconnect per page
# is then a small share of its time.
CONNECTION_LINGER_SECONDS = 0.05


# --- encoders (pure) ---------------------------------------------------------------------


def neutralise_cell(value: str) -> str:
    """Prefix a text cell with ``'`` when a spreadsheet would read it as a formula."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def csv_cells(frame: Mapping[str, Any]) -> list[Any]:
    """The CSV row of one message frame, in CSV_COLUMNS order; text cells neutralised."""
    user = frame["user"]
    return [
        frame["seq"],
        frame["id"],
        neutralise_cell(frame["room"]),
        user["id"],
        neutralise_cell(user["username"]),
        neutralise_cell(frame["text"]),
        neutralise_cell(frame["client_id"] or ""),
        frame["created_at"],
        frame.get("status", ""),
        frame.get("edited_at") or "",
        "true" if frame.get("deleted") else "false",
    ]


def encode_csv(frames: Iterable[Mapping[str, Any]]) -> bytes:
    """CSV rows (RFC 4180: CRLF, quotes doubled, fields with quotes/commas/newlines quoted)."""
    return write_csv(csv_cells(frame) for frame in frames)


def write_csv(rows: Iterable[Sequence[Any]]) -> bytes:
    """Rows of cells as CSV (one ``csv.writer.writerows`` call: the loop runs in C)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def csv_header() -> bytes:
    """The first bytes of a CSV export: a UTF-8 byte order mark and the header row."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(CSV_COLUMNS)
    return (UTF8_BOM + buffer.getvalue()).encode("utf-8")


def ndjson_line(frame: dict[str, Any]) -> str:
    """The frame as the WebSocket sends it, with LINE_BREAKS_TO_ESCAPE escaped, and ``\\n``."""
    # JSON allows these raw only inside strings, so the escape decodes to the same value.
    return protocol.encode(frame).translate(LINE_BREAKS_TO_ESCAPE) + "\n"


def encode_ndjson(frames: Sequence[dict[str, Any]]) -> bytes:
    """One frame per line, ``\\n`` after each; nothing else a reader could split a line at."""
    return escape_line_breaks(protocol.encode_lines(frames))


def escape_line_breaks(data: bytes) -> bytes:
    """``data`` (UTF-8) with LINE_BREAKS_TO_ESCAPE escaped, as ``ndjson_line`` does per line."""
    # UTF-8 is self-synchronising: these byte sequences occur only as these characters, so
    # a bytes replace over a whole page is exact, and far cheaper than str.translate per line.
    for raw, escaped in LINE_BREAK_BYTES:
        # A search for the last byte first (memchr): ``raw in data`` with these needles costs
        # ~250 ns per 230-byte row, as much as encoding the row (measured), and this byte is
        # absent from most pages (all-ASCII ones, and most others).
        if raw[-1:] in data and raw in data:
            data = data.replace(raw, escaped)
    return data


@dataclass(frozen=True)
class ExportFormat:
    name: str
    content_type: str
    extension: str

    def header(self) -> bytes:
        return csv_header() if self.name == "csv" else b""

    def encode(self, frames: Sequence[dict[str, Any]]) -> bytes:
        return encode_csv(frames) if self.name == "csv" else encode_ndjson(frames)

    def encode_rows(
        self,
        rows: Sequence[Sequence[Any]],
        room_slug: str,
        usernames: Mapping[int, str],
        iso: Callable[[Any], str],
    ) -> bytes:
        """``encode`` of the raw rows' frames (the same bytes), from the rows themselves."""
        if self.name == "csv":
            return csv_lines(rows, room_slug, usernames, iso)
        return encode_ndjson(message_frames(rows, room_slug, usernames, iso))


FORMATS = {
    "ndjson": ExportFormat("ndjson", "application/x-ndjson; charset=utf-8", "ndjson"),
    "csv": ExportFormat("csv", "text/csv; charset=utf-8", "csv"),
}


# What a client refused with too_many_exports is told to wait: exports take seconds to minutes.
TOO_MANY_EXPORTS_RETRY_AFTER_SECONDS = 30


def too_many_exports_message() -> str:
    limit = app_settings.EXPORT_MAX_CONCURRENT_PER_USER
    return f"At most {limit} exports at a time per user; wait for one to finish."


def parse_format(value: str | None) -> ExportFormat:
    if value is None:
        return FORMATS["ndjson"]
    try:
        return FORMATS[value]
    except KeyError:
        raise BadParameter(f"format must be one of {', '.join(FORMATS)}.") from None


# --- rows to frames ----------------------------------------------------------------------

# Columns read per message, in this order (the username comes from UsernameCache).
ROW_FIELDS = (
    "seq",
    "id",
    "text",
    "client_id",
    "created_at",
    "status",
    "edited_at",
    "deleted",
    "update_seq",
    "user_id",
)
# Usernames kept per export: one query per page reads those not cached yet. Past this many
# authors the cache starts again, so an export's memory stays bounded however many wrote.
USERNAME_CACHE_MAX_ENTRIES = 10_000


class UsernameCache:
    """user id -> username for one export, read once per author instead of joined per row."""

    def __init__(self, max_entries: int = USERNAME_CACHE_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.names: dict[int, str] = {}

    def fill(self, user_ids: Iterable[int]) -> dict[int, str]:
        """Read the usernames of ``user_ids`` not cached yet (one query); return the cache."""
        missing = set(user_ids).difference(self.names)
        if not missing:
            return self.names
        if len(self.names) + len(missing) > self.max_entries:
            self.names = {}
        user_model = get_user_model()
        # get_username() reads USERNAME_FIELD: custom user models need not call it username.
        found = user_model._default_manager.filter(pk__in=missing).values_list(
            "pk", user_model.USERNAME_FIELD
        )
        self.names.update((pk, str(name)) for pk, name in found)
        return self.names


def iso_datetimes(connection: BaseDatabaseWrapper) -> Callable[[Any], str]:
    """A function from this connection's raw datetime values to ``datetime.isoformat()``.

    Raw cursor values skip Django's converters, which cost more than the rest of a row: on
    SQLite the column is read as text (``CAST``, see ``page_sql``) and is, for values Django
    wrote, ``str()`` of the naive UTC datetime, which becomes its isoformat by string edits.
    """
    tz = connection.timezone if settings.USE_TZ else None
    if connection.vendor == "sqlite":
        offset = "+00:00" if settings.USE_TZ else ""
        utc = connection.timezone_name == "UTC"

        def from_text(value: str) -> str:
            if utc and len(value) in (19, 26) and value[10] == " ":
                return value[:10] + "T" + value[11:] + offset
            return _aware(parse_datetime(value), tz).isoformat()  # type: ignore[arg-type]

        return from_text
    return lambda value: _aware(value, tz).isoformat()


def _aware(value: datetime, tz: tzinfo | None) -> datetime:
    # As Django's converters do (MySQL, SQLite): naive values are in the connection's zone.
    if tz is not None and value.tzinfo is None:
        return timezone.make_aware(value, tz)
    return value


def page_sql(room: RoomSnapshot, after: int, limit: int) -> tuple[str, tuple[Any, ...], str]:
    """The SQL of one keyset page (ROW_FIELDS in order), its parameters and its database."""
    queryset = Message.objects.filter(room_id=room.id, seq__gt=after, seq__lte=room.upto)
    db = queryset.db
    sqlite = connections[db].vendor == "sqlite"
    # Every column an annotation, so the SQL selects them in ROW_FIELDS order.
    columns = {f"_{name}": _column(name, sqlite) for name in ROW_FIELDS}
    queryset = queryset.annotate(**columns).values_list(*columns).order_by("seq")[:limit]
    sql, params = queryset.query.get_compiler(using=db).as_sql()
    return sql, tuple(params), db


def _column(name: str, sqlite: bool) -> Any:
    if sqlite and name in ("created_at", "edited_at"):
        # Read as text: the sqlite3 module would otherwise parse each value with Django's
        # parse_datetime (a regular expression per row), only for iso_datetimes to format it.
        return Cast(name, TextField())
    return F(name)


# --- lines built by SQLite -------------------------------------------------------------------
#
# On SQLite the database can write each line itself: rows never become Python objects, which
# is 2.4x the rows per CPU second of the Python path before any HTTP (bench/export_floor.py,
# docs/benchmarks.md). The line must be the bytes the Python path writes: json_quote()
# escapes exactly as orjson does (checked once per process on every ASCII character and a
# few others, else this path is off), CSV cells are neutralised and quoted by csv_field's
# rules, datetimes become isoformat by the same string edits as iso_datetimes (a row in
# another shape makes its page take the Python path), and the author comes from a join.
# Hosts whose user model has a non-integer key or a non-text USERNAME_FIELD or lives in
# another database, or whose database is not in UTC, use the Python path.

_JSON_QUOTE_PROBE = "".join(map(chr, range(128))) + "\x85\u2028\u2029\ufeff\uffff😀 ✓ 東京"
_json_quote_matches: dict[str, bool] = {}


def _iso_shape_sql(column: str) -> str:
    # The shape iso_datetimes edits into isoformat; the page goes the Python way otherwise.
    return f"length({column}) IN (19, 26) AND substr({column}, 11, 1) = ' '"


def _printf_sql(template: str, *args: str) -> str:
    # Doubled percents: Django's SQLite cursor turns %s into ? and %% back into %.
    return f"printf('{template.replace('%', '%%')}', {', '.join(args)})"


def _iso_sql(column: str, json: bool) -> str:
    # iso_datetimes' string edits, for a value of _iso_shape_sql's shape. As JSON, quoted by
    # json_quote as orjson quotes it: the shape check does not look at every character, and
    # a value written by hand could hold a quote. (CSV writes dates as they are, as
    # csv_lines does.)
    iso = _printf_sql("%sT%s+00:00", f"substr({column}, 1, 10)", f"substr({column}, 12)")
    return f"json_quote({iso})" if json else iso


def _csv_field_sql(value: str, neutralise: bool = True) -> str:
    # csv_field(neutralise_cell(value)): the ' before a formula start needs no quotes itself.
    prefix = "''"
    if neutralise:
        starts = ", ".join(["'='", "'+'", "'-'", "'@'", "char(9)", "char(13)"])
        prefix = f"CASE WHEN substr({value}, 1, 1) IN ({starts}) THEN '''' ELSE '' END"
    # _NEEDS_QUOTES: four instr() scans cost less than one GLOB with a class (measured).
    needs_quotes = " OR ".join(
        f"instr({value}, {c})" for c in ("','", "'\"'", "char(13)", "char(10)")
    )
    quoted = f"""'"' || {prefix} || replace({value}, '"', '""') || '"'"""
    return f"CASE WHEN {needs_quotes} THEN {quoted} ELSE {prefix} || {value} END"


# One printf per line: a chain of || copies the growing line at every step (printf is 1.2-1.5x
# the rows per CPU second of the chain, measured on a million-message room).
_LINE_FORMAT = (
    '{"type":"message","seq":%d,"id":%d,"room":%s,"user":{"id":%d,"username":%s},'
    '"text":%s,"client_id":%s,"created_at":%s%s%s}'
)
_CHANGE_FORMAT = ',"edited_at":%s,"deleted":%s,"update_seq":%d'
_CSV_FORMAT = "%d,%d,%s,%d,%s,%s,%s,%s,%s,%s,%s"
# What separates (and ends) the lines of a page, in SQL and as bytes.
LINE_ENDS = {"ndjson": ("char(10)", b"\n"), "csv": ("char(13) || char(10)", b"\r\n")}


def _csv_fields_sql(m: str, username: str, created: str, edited: str) -> str:
    # csv_lines' row; the room's cell is a parameter (made once, in fetch_lines).
    client_id = _csv_field_sql(f"{m}.client_id")
    return _printf_sql(
        _CSV_FORMAT,
        f"{m}.seq",
        f"{m}.id",
        "%s",
        f"{m}.user_id",
        _csv_field_sql(username),
        _csv_field_sql(f"{m}.text"),
        f"CASE WHEN {m}.client_id = '' THEN '' ELSE {client_id} END",
        _iso_sql(created, json=False),
        _csv_field_sql(f"{m}.status", neutralise=False),
        f"CASE WHEN {m}.update_seq <> 0 AND {edited} IS NOT NULL"
        f" THEN {_iso_sql(edited, json=False)} ELSE '' END",
        f"CASE WHEN {m}.update_seq <> 0 AND {m}.deleted THEN 'true' ELSE 'false' END",
    )


def _ndjson_fields_sql(m: str, username: str, created: str, edited: str) -> str:
    # protocol.message_frame as orjson writes it; the room's slug is a parameter.
    change = _printf_sql(
        _CHANGE_FORMAT,
        f"CASE WHEN {edited} IS NULL THEN 'null' ELSE {_iso_sql(edited, json=True)} END",
        f"CASE WHEN {m}.deleted THEN 'true' ELSE 'false' END",
        f"{m}.update_seq",
    )
    status = f"""',"status":' || json_quote({m}.status)"""
    return _printf_sql(
        _LINE_FORMAT,
        f"{m}.seq",
        f"{m}.id",
        "json_quote(%s)",
        f"{m}.user_id",
        f"json_quote({username})",
        f"json_quote({m}.text)",
        f"CASE WHEN {m}.client_id = '' THEN 'null' ELSE json_quote({m}.client_id) END",
        _iso_sql(created, json=True),
        f"CASE WHEN {m}.status = '' THEN '' ELSE {status} END",
        f"CASE WHEN {m}.update_seq = 0 THEN '' ELSE {change} END",
    )


def sqlite_lines_sql(fmt: str) -> str | None:
    """The SQL of one page of ``fmt`` lines as one row (``SqlPage``; parameters: the room's
    value in a line, room id, after, upto, limit), or None where SQLite cannot write the
    same bytes as the Python path."""
    from django.db import models

    connection = connections[Message.objects.db]
    if connection.vendor != "sqlite" or not settings.USE_TZ:
        return None
    user_model = get_user_model()
    if router.db_for_read(user_model) != connection.alias:
        return None  # the join needs the users in the messages' database
    if connection.timezone_name != "UTC":
        return None
    username = user_model._meta.get_field(user_model.USERNAME_FIELD)
    if not isinstance(user_model._meta.pk, models.IntegerField):
        return None
    if not isinstance(username, models.CharField):
        return None
    if connection.alias not in _json_quote_matches:
        _json_quote_matches[connection.alias] = _json_quote_agrees(connection)
    if not _json_quote_matches[connection.alias]:
        return None
    qn = connection.ops.quote_name
    m, u = qn(Message._meta.db_table), qn(user_model._meta.db_table)
    user_pk, user_name = qn(user_model._meta.pk.column), qn(username.column)
    created, edited = f"{m}.{qn('created_at')}", f"{m}.{qn('edited_at')}"
    # printf writes NULL as nothing: the shapes are checked first, and a row that fails
    # them is NULL, which sends its page the Python way (every other column is NOT NULL).
    shapes = (
        f"{_iso_shape_sql(created)} AND ({m}.update_seq = 0 OR {edited} IS NULL"
        f" OR ({_iso_shape_sql(edited)}))"
    )
    if fmt == "csv":
        # printf's %s ends at a NUL (JSON escapes it; CSV keeps it): such a row's page goes
        # the Python way.
        texts = (f"{u}.{user_name}", f"{m}.text", f"{m}.client_id")
        shapes += "".join(f" AND instr({text}, char(0)) = 0" for text in texts)
        fields = _csv_fields_sql(m, f"{u}.{user_name}", created, edited)
    else:
        fields = _ndjson_fields_sql(m, f"{u}.{user_name}", created, edited)
    line = f"CASE WHEN {shapes} THEN {fields} END"
    # Identifiers from the models' metadata, quoted; every value is a parameter.
    page = (
        f"SELECT {m}.seq AS seq, {line} AS line FROM {m}"  # noqa: S608
        f" JOIN {u} ON {u}.{user_pk} = {m}.user_id"
        f" WHERE {m}.room_id = %s AND {m}.seq > %s AND {m}.seq <= %s ORDER BY {m}.seq LIMIT %s"
    )
    # The whole page as one value: the sqlite3 module lets the GIL go once per row it steps,
    # and each row taken back from the event loop thread cost more than SQLite's own work
    # (1.4x the rows/s of a row per line, measured). count(line) < count(*) when a line is
    # NULL (group_concat skips those). SQLite 3.44 takes the order inside the aggregate;
    # before it, the aggregate reads the ordered subquery in its order (the page is not
    # flattened into it: it has a LIMIT), which the byte-for-byte tests pin.
    order = " ORDER BY seq" if sqlite3.sqlite_version_info >= (3, 44, 0) else ""
    separator = LINE_ENDS[fmt][0]
    return (
        # As a BLOB: the UTF-8 bytes as SQLite holds them, not decoded to str and encoded back.
        f"SELECT count(*), count(line), max(seq),"  # noqa: S608
        f" CAST(group_concat(line, {separator}{order}) AS BLOB) FROM ({page})"
    )


def _json_quote_agrees(connection: BaseDatabaseWrapper) -> bool:
    import orjson

    with connection.cursor() as cursor:
        cursor.execute("SELECT json_quote(%s)", [_JSON_QUOTE_PROBE])
        (quoted,) = cursor.fetchone()
    agrees = isinstance(quoted, str) and quoted.encode() == orjson.dumps(_JSON_QUOTE_PROBE)
    if not agrees:
        logger.warning("SQLite's json_quote differs from orjson: exports take the Python path")
    return agrees


@dataclass(frozen=True)
class SqlPage:
    """One page as ``sqlite_lines_sql`` writes it."""

    rows: int
    lines: int  # fewer than rows: a row SQLite could not write (its page goes the Python way)
    last_seq: int | None
    data: bytes | None  # the lines, joined by \n (no final one); None for no rows


def fetch_lines(room: RoomSnapshot, after: int, limit: int, fmt: str, sql: str) -> SqlPage:
    # The room is the same in every line: its JSON string or CSV cell is made once, here.
    value = csv_field(neutralise_cell(room.slug)) if fmt == "csv" else room.slug
    with connections[Message.objects.db].cursor() as cursor:
        cursor.execute(sql, (value, room.id, after, room.upto, limit))
        return SqlPage(*cursor.fetchone())


def fetch_rows(room: RoomSnapshot, after: int, limit: int) -> tuple[list[tuple[Any, ...]], str]:
    """Raw rows (ROW_FIELDS) of one page through a plain cursor, and the database's alias."""
    sql, params, db = page_sql(room, after, limit)
    with connections[db].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall(), db


def message_frames(
    rows: Iterable[Sequence[Any]],
    room_slug: str,
    usernames: Mapping[int, str],
    iso: Callable[[Any], str],
) -> list[dict[str, Any]]:
    """``protocol.message_frame`` of each raw row (ROW_FIELDS), without a model instance.

    tests/test_export.py pins this to message_frame for every kind of message.
    """
    users = {pk: protocol.user_frame(_Author(pk, name)) for pk, name in usernames.items()}
    frames = []
    for seq, pk, text, client_id, created_at, status, edited_at, deleted, update_seq, uid in rows:
        frame = {
            "type": "message",
            "seq": seq,
            "id": pk,
            "room": room_slug,
            "user": users[uid],
            "text": text,
            "client_id": client_id or None,
            "created_at": iso(created_at),
        }
        if status:
            frame["status"] = status
        if update_seq:
            frame["edited_at"] = iso(edited_at) if edited_at is not None else None
            frame["deleted"] = bool(deleted)
            frame["update_seq"] = update_seq
        frames.append(frame)
    return frames


def csv_field(value: str) -> str:
    """``value`` as one CSV field, exactly as ``csv.writer`` (QUOTE_MINIMAL, CRLF) writes it."""
    if _NEEDS_QUOTES(value):
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_lines(
    rows: Iterable[Sequence[Any]],
    room_slug: str,
    usernames: Mapping[int, str],
    iso: Callable[[Any], str],
) -> bytes:
    """``encode_csv`` of each raw row's frame, without building frames or a csv.writer.

    csv.writer copies every character of every field through its quoting state machine (it
    cost 2.6x this loop, measured); here only the text fields are scanned, by a regular
    expression, and numbers, dates and true/false go out as they are: they never need quotes.
    tests/test_export.py pins the output to csv.writer's for awkward texts.
    """
    room = csv_field(neutralise_cell(room_slug))
    names = {pk: csv_field(neutralise_cell(name)) for pk, name in usernames.items()}
    prefixes, needs_quotes = FORMULA_PREFIXES, _NEEDS_QUOTES
    lines = []
    for seq, pk, text, client_id, created_at, status, edited_at, deleted, update_seq, uid in rows:
        if text.startswith(prefixes):
            text = "'" + text
        if needs_quotes(text):
            text = '"' + text.replace('"', '""') + '"'
        if client_id:
            client_id = csv_field(neutralise_cell(client_id))
        if status:
            status = csv_field(status)
        changed = iso(edited_at) if update_seq and edited_at is not None else ""
        flag = "true" if update_seq and deleted else "false"
        lines.append(
            f"{seq},{pk},{room},{uid},{names[uid]},{text},{client_id},{iso(created_at)},"
            f"{status},{changed},{flag}\r\n"
        )
    return "".join(lines).encode("utf-8")


@dataclass(slots=True)
class _Author:
    pk: int
    username: str

    def get_username(self) -> str:
        return self.username


# --- the stream ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomSnapshot:
    """A room to export: every message with ``after < seq <= upto``."""

    id: int
    slug: str
    upto: int


@dataclass(frozen=True)
class Page:
    data: bytes
    rows: int
    last_seq: int


def read_page(
    room: RoomSnapshot,
    after: int,
    limit: int,
    fmt: ExportFormat,
    usernames: UsernameCache | None = None,
) -> Page:
    """Read and encode the next page of a room (the connection stays open: ``PageReader``)."""
    cache = usernames if usernames is not None else UsernameCache()
    if (sql := sqlite_lines_sql(fmt.name)) is not None:
        lines = fetch_lines(room, after, limit, fmt.name, sql)
        if not lines.rows:
            return Page(b"", 0, after)
        if lines.lines == lines.rows and lines.data is not None and lines.last_seq is not None:
            data = lines.data + LINE_ENDS[fmt.name][1]
            if fmt.name == "ndjson":
                data = escape_line_breaks(data)
            return Page(data, lines.rows, lines.last_seq)
    rows, db = fetch_rows(room, after, limit)
    if not rows:
        return Page(b"", 0, after)
    names = cache.fill({row[-1] for row in rows})
    iso = iso_datetimes(connections[db])
    return Page(fmt.encode_rows(rows, room.slug, names, iso), len(rows), rows[-1][0])


def release_connections(ending: bool = False) -> None:
    """Close this thread's database connections: the obsolete or broken ones (``CONN_MAX_AGE``
    decides, as after a request), or every one when the thread is ``ending``."""
    try:
        if ending:
            connections.close_all()
        else:
            close_old_connections()
    except Exception:
        # The export has its rows or its own error by now; a failed close must not add one.
        logger.warning("Closing an export's database connection failed", exc_info=True)


class PageReader:
    """Reads one export's pages on a thread of its own, one hop per page.

    The thread's database connection stays open from one page to the next while the reads
    follow each other within ``CONNECTION_LINGER_SECONDS``, and is let go (``CONN_MAX_AGE``
    decides, as after a request) once none has. ``close()`` ends the thread and closes its
    connections, after the read in flight if there is one: an export that is cancelled
    mid-read leaves nothing open either.
    """

    def __init__(self, fmt: ExportFormat) -> None:
        self.fmt = fmt
        self.usernames = UsernameCache()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-export")
        self._read = sync_to_async(read_page, thread_sensitive=False, executor=self._executor)
        self._linger: asyncio.TimerHandle | None = None
        self._closed = False
        self._started = False  # the thread exists once a read was submitted

    async def read(self, room: RoomSnapshot, after: int, limit: int) -> Page:
        self._stop_lingering()
        self._started = True
        try:
            return await self._read(room, after, limit, self.fmt, self.usernames)
        finally:
            if not self._closed:
                loop = asyncio.get_running_loop()
                self._linger = loop.call_later(CONNECTION_LINGER_SECONDS, self._release)

    def close(self) -> None:
        """End the thread once its queue is done, closing its connections last (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_lingering()
        if self._started:
            self._executor.submit(release_connections, True)
        self._executor.shutdown(wait=False)

    def _release(self) -> None:
        self._linger = None
        if not self._closed:
            self._executor.submit(release_connections)

    def _stop_lingering(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None


def next_page_size(page: Page, page_size: int) -> int:
    """Rows to read next so the chunk is about TARGET_CHUNK_BYTES, at most ``page_size``."""
    bytes_per_row = max(1, len(page.data) // max(1, page.rows))
    return max(1, min(page_size, TARGET_CHUNK_BYTES // bytes_per_row))


async def stream_export(
    rooms: Sequence[RoomSnapshot],
    fmt: ExportFormat,
    *,
    after: int = 0,
    page_size: int,
    audit: str,
    lease: Lease | None = None,
) -> AsyncGenerator[bytes, None]:
    """Yield the export of ``rooms`` in order, one database page per chunk.

    Logs one line when it starts and one when it ends (``complete``, ``aborted`` when the
    client left, ``failed``): who exported what is worth an audit trail. Releases ``lease``
    (the user's export place) when it ends.
    """
    rows = 0
    outcome = "aborted"
    pending: asyncio.Future[Page] | None = None
    reader = PageReader(fmt)
    logger.info("Export started: %s format=%s after=%d", audit, fmt.name, after)
    try:
        # Every read runs on the reader's thread: the request's own would sit idle (and
        # hold whatever connection the host's middleware opened) until the download ends.
        release_request_thread()
        # The first chunk goes out before any query: the client gets the status line and
        # headers (and the CSV header row) at once, whatever the room's size.
        yield fmt.header()
        limit = min(page_size, FIRST_PAGE_ROWS)
        for room in rooms:
            if after >= room.upto:
                continue
            pending = asyncio.ensure_future(reader.read(room, after, limit))
            while pending is not None:
                page = await pending
                pending = None
                if not page.rows:
                    break
                rows += page.rows
                limit = next_page_size(page, page_size)
                if page.last_seq < room.upto:
                    # Read the next page while this one is sent: with backpressure the two
                    # would otherwise take turns (half the throughput, measured).
                    next_page = reader.read(room, page.last_seq, limit)
                    pending = asyncio.ensure_future(next_page)
                yield page.data
        outcome = "complete"
    except Exception:
        outcome = "failed"
        logger.exception("Export failed: %s", audit)
        raise
    finally:
        if pending is not None:
            # The thread finishes its page on its own; close() queues behind it.
            pending.cancel()
            pending.add_done_callback(_forget)
        if lease is not None:
            lease.release_soon()
        reader.close()
        logger.info("Export %s: %s rows=%d", outcome, audit, rows)


def _forget(future: asyncio.Future[Page]) -> None:
    # Retrieve the outcome of an abandoned read so asyncio does not log it as unhandled.
    if not future.cancelled():
        future.exception()


def export_response(
    rooms: Sequence[RoomSnapshot],
    fmt: ExportFormat,
    *,
    filename: str,
    after: int = 0,
    page_size: int,
    audit: str,
    lease: Lease | None = None,
) -> StreamingHttpResponse:
    """A streaming download of ``rooms``' messages (use from async views or the admin).

    ``lease`` (``chat.quotas.exports``) is released when the download ends, or when the body
    is dropped unstarted (the client left before it began)."""
    body = stream_export(rooms, fmt, after=after, page_size=page_size, audit=audit, lease=lease)
    if lease is not None:
        # An async generator that never started runs no finally.
        weakref.finalize(body, lease.release_soon)
    response = StreamingHttpResponse(body, content_type=fmt.content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}.{fmt.extension}"'
    response["Cache-Control"] = "no-store"
    response["X-Content-Type-Options"] = "nosniff"
    if len(rooms) == 1:
        # The export holds every message up to here: resume live with ?after=<this>.
        response["X-Chat-Last-Seq"] = str(rooms[0].upto)
    return response
