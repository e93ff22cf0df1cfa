"""Message exports: NDJSON and CSV encoders (pure) and the keyset-paged stream behind them.

An export reads ``seq > last`` pages of ``values()`` rows in seq order, one query per page,
so memory does not depend on the room's size: no model instances, no server-side cursor
(PostgreSQL materialises a WITH HOLD cursor's whole result first in async code). Each page is
read, encoded and followed by ``close_old_connections()`` in one thread hop, so a slow reader
holds no database connection between pages and a cancelled export cannot leave one open. The
next page is read while the current one is sent; ``chat.backpressure`` makes that sending wait
for the client under daphne, so at most about two pages are held per export.

Every row is built with ``protocol.message_frame``: an NDJSON line is the WebSocket message
frame (the same bytes but for three escaped line separators); a CSV row is the same fields,
flattened. docs/protocol.md describes both.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db import close_old_connections
from django.http import StreamingHttpResponse

from . import protocol
from .api import BadParameter
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
# Excel reads a CSV file as UTF-8 only when it starts with a byte order mark.
UTF8_BOM = "\ufeff"
# JSON leaves NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR raw inside strings, but Python's
# str.splitlines(), editors and other line readers break lines at them, and JavaScript before
# ES2019 refuses them in a string literal (JSON pasted into a script): an NDJSON line must
# hold no line break but its final \n. (The other characters splitlines() breaks at are
# control characters, which JSON escapes anyway.)
LINE_BREAKS_TO_ESCAPE = {ord(c): f"\\u{ord(c):04x}" for c in "\u0085\u2028\u2029"}
# Pages shrink below CHAT_EXPORT_PAGE_SIZE rows when texts are long, so that one page (the
# rows, then the encoded chunk) stays near this size: 2000 texts of 4000 emoji would be 32 MB.
TARGET_CHUNK_BYTES = 1024 * 1024
# The first page is small: its rows reach the client quickly, and it measures the row size.
FIRST_PAGE_ROWS = 100


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
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows(csv_cells(frame) for frame in frames)
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


def encode_ndjson(frames: Iterable[dict[str, Any]]) -> bytes:
    """One frame per line, ``\\n`` after each; nothing else a reader could split a line at."""
    return "".join(ndjson_line(frame) for frame in frames).encode("utf-8")


@dataclass(frozen=True)
class ExportFormat:
    name: str
    content_type: str
    extension: str

    def header(self) -> bytes:
        return csv_header() if self.name == "csv" else b""

    def encode(self, frames: Sequence[dict[str, Any]]) -> bytes:
        return encode_csv(frames) if self.name == "csv" else encode_ndjson(frames)


FORMATS = {
    "ndjson": ExportFormat("ndjson", "application/x-ndjson; charset=utf-8", "ndjson"),
    "csv": ExportFormat("csv", "text/csv; charset=utf-8", "csv"),
}


def parse_format(value: str | None) -> ExportFormat:
    if value is None:
        return FORMATS["ndjson"]
    try:
        return FORMATS[value]
    except KeyError:
        raise BadParameter(f"format must be one of {', '.join(FORMATS)}.") from None


# --- rows to frames ----------------------------------------------------------------------


@dataclass(slots=True)
class _Author:
    pk: int
    username: str

    def get_username(self) -> str:
        return self.username


@dataclass(slots=True)
class _Row:
    id: int
    seq: int
    text: str
    client_id: str
    created_at: datetime
    status: str
    edited_at: datetime | None
    deleted: bool
    update_seq: int


def frame_from_values(row: Mapping[str, Any], room_slug: str, username_key: str) -> dict[str, Any]:
    """The message frame of one ``values()`` row (see ``row_fields``), via message_frame."""
    message = _Row(
        row["id"],
        row["seq"],
        row["text"],
        row["client_id"],
        row["created_at"],
        row["status"],
        row["edited_at"],
        row["deleted"],
        row["update_seq"],
    )
    return protocol.message_frame(message, room_slug, _Author(row["user_id"], row[username_key]))


def username_key() -> str:
    # The user's USERNAME_FIELD through the join, as get_username() reads it.
    return "user__" + get_user_model().USERNAME_FIELD


def row_fields() -> tuple[str, ...]:
    return (
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
        username_key(),
    )


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


def read_page(room: RoomSnapshot, after: int, limit: int, fmt: ExportFormat) -> Page:
    """Read and encode the next page of a room, then release the database connection."""
    try:
        key = username_key()
        rows = list(
            Message.objects.filter(room_id=room.id, seq__gt=after, seq__lte=room.upto)
            .order_by("seq")
            .values(*row_fields())[:limit]
        )
    finally:
        # With CONN_MAX_AGE=0 this closes the connection: a slow reader holds none while
        # the client drains the page. Hosts with persistent connections keep theirs.
        close_old_connections()
    if not rows:
        return Page(b"", 0, after)
    frames = [frame_from_values(row, room.slug, key) for row in rows]
    return Page(fmt.encode(frames), len(rows), rows[-1]["seq"])


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
) -> AsyncGenerator[bytes, None]:
    """Yield the export of ``rooms`` in order, one database page per chunk.

    Logs one line when it starts and one when it ends (``complete``, ``aborted`` when the
    client left, ``failed``): who exported what is worth an audit trail.
    """
    rows = 0
    outcome = "aborted"
    pending: asyncio.Future[Page] | None = None
    aread_page = sync_to_async(read_page)
    logger.info("Export started: %s format=%s after=%d", audit, fmt.name, after)
    try:
        # The first chunk goes out before any query: the client gets the status line and
        # headers (and the CSV header row) at once, whatever the room's size.
        yield fmt.header()
        limit = min(page_size, FIRST_PAGE_ROWS)
        for room in rooms:
            if after >= room.upto:
                continue
            pending = asyncio.ensure_future(aread_page(room, after, limit, fmt))
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
                    pending = asyncio.ensure_future(aread_page(room, page.last_seq, limit, fmt))
                yield page.data
        outcome = "complete"
    except Exception:
        outcome = "failed"
        logger.exception("Export failed: %s", audit)
        raise
    finally:
        if pending is not None:
            # The thread finishes its page (and releases its connection) on its own.
            pending.cancel()
            pending.add_done_callback(_forget)
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
) -> StreamingHttpResponse:
    """A streaming download of ``rooms``' messages (use from async views or the admin)."""
    response = StreamingHttpResponse(
        stream_export(rooms, fmt, after=after, page_size=page_size, audit=audit),
        content_type=fmt.content_type,
    )
    response["Content-Disposition"] = f'attachment; filename="{filename}.{fmt.extension}"'
    response["Cache-Control"] = "no-store"
    response["X-Content-Type-Options"] = "nosniff"
    if len(rooms) == 1:
        # The export holds every message up to here: resume live with ?after=<this>.
        response["X-Chat-Last-Seq"] = str(rooms[0].upto)
    return response
