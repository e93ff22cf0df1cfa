"""Message search: PostgreSQL full-text search over a GIN index, a substring match elsewhere.

``GET /chat/search/?q=`` and ``GET /chat/<slug>/search/?q=`` (docs/protocol.md, "Search")
page newest first by message id (keyset, like history), so a page never shifts while
messages arrive. Only rooms the user may read are searched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.db import connections, router
from django.db.models import BooleanField, QuerySet
from django.db.models.expressions import RawSQL
from django.urls import reverse

from .api import MAX_SEQ, BadParameter, parse_int
from .models import Message, Room

# Text search configuration of the index and of every query: "simple" lowercases words and
# stems nothing, so it works alike for every language a room may speak. The query must use
# the very expression of the index (migration 0008) for PostgreSQL to use it.
FTS_CONFIG = "simple"
FTS_INDEX = "chat_message_text_fts"
_FTS_MATCH = (
    f"to_tsvector('{FTS_CONFIG}'::regconfig, chat_message.text) "
    f"@@ websearch_to_tsquery('{FTS_CONFIG}'::regconfig, %s)"
)


@dataclass(frozen=True)
class SearchParams:
    q: str
    before: int | None
    limit: int


def parse_search_params(
    query: Mapping[str, str], *, max_bytes: int, default_limit: int, max_limit: int
) -> SearchParams:
    """Read ``q`` (1..max_bytes bytes of UTF-8), ``before`` (a message id) and ``limit``."""
    q = query.get("q", "").strip()
    if not q:
        raise BadParameter("q must not be empty.")
    # In bytes: what a search costs (the pattern the database scans with) grows with them.
    if len(q.encode("utf-8", "surrogatepass")) > max_bytes:
        raise BadParameter(f"q is longer than {max_bytes} bytes (UTF-8).")
    if "\x00" in q:
        raise BadParameter("q contains a NUL character.")
    before = query.get("before")
    limit = parse_int(query.get("limit"), "limit", default=default_limit, minimum=1)
    return SearchParams(
        q=q,
        before=None if before is None else parse_int(before, "before", default=0, minimum=1),
        limit=min(limit, max_limit),
    )


def uses_full_text() -> bool:
    """Whether messages live in PostgreSQL, where the full-text index exists."""
    return connections[router.db_for_read(Message)].vendor == "postgresql"


def matching(messages: QuerySet[Message], q: str) -> QuerySet[Message]:
    """Messages whose text matches ``q``: all its words (PostgreSQL, websearch syntax), or
    ``q`` as a case-insensitive substring (other databases; SQLite folds ASCII case only)."""
    if uses_full_text():
        # The SQL is a constant (the index's expression, which Django's SearchVector would
        # wrap in COALESCE and so miss the index); q is a bound parameter.
        match = RawSQL(_FTS_MATCH, (q,), output_field=BooleanField())  # noqa: S611
        return messages.filter(match)
    return messages.filter(text__icontains=q)


def page_query(rooms: QuerySet[Room], params: SearchParams) -> QuerySet[Message]:
    """The query of one page, one row more than asked (which says whether more exist)."""
    rows = matching(Message.objects.filter(room__in=rooms), params.q)
    if params.before is not None:
        rows = rows.filter(pk__lt=params.before)
    return rows.select_related("room", "user").order_by("-pk")[: params.limit + 1]


# The ids of one page of full-text matches. OFFSET 0 keeps the inner query from being merged
# into the outer one: PostgreSQL then finds every match through the GIN index and sorts only
# those. Merged, with ORDER BY id LIMIT n, the planner walks the primary key backwards testing
# each message, which is quick for a frequent word but reads the whole table for a rare or
# absent one: 2 s instead of 2 ms on 100,000 messages (docs/benchmarks.md, "Search").
# Built from constants only; every value is a bound parameter.
_FTS_PAGE_IDS = (
    "SELECT id FROM (SELECT id FROM chat_message WHERE "  # noqa: S608
    f"{_FTS_MATCH} AND room_id = ANY(%s) AND id < %s OFFSET 0) AS matches "
    "ORDER BY id DESC LIMIT %s"
)


def fts_page_sql(room_ids: list[int], params: SearchParams) -> tuple[str, list[Any]]:
    """The SQL and parameters of one page of full-text match ids (PostgreSQL)."""
    before = params.before if params.before is not None else MAX_SEQ
    return _FTS_PAGE_IDS, [params.q, room_ids, before, params.limit + 1]


def _page_rows(rooms: QuerySet[Room], params: SearchParams) -> list[Message]:
    if not uses_full_text():
        return list(page_query(rooms, params))
    sql, args = fts_page_sql(list(rooms.values_list("pk", flat=True)), params)
    with connections[router.db_for_read(Message)].cursor() as cursor:
        cursor.execute(sql, args)
        ids = [row[0] for row in cursor.fetchall()]
    return list(Message.objects.filter(pk__in=ids).select_related("room", "user").order_by("-pk"))


def search_page(rooms: QuerySet[Room], params: SearchParams) -> dict[str, Any]:
    """One page of matches in ``rooms``, newest first (``results``, ``has_more``,
    ``next_before``)."""
    found = _page_rows(rooms, params)
    has_more = len(found) > params.limit
    page = found[: params.limit]
    return {
        "q": params.q,
        "results": [result(m) for m in page],
        "has_more": has_more,
        "next_before": page[-1].pk if has_more else None,
    }


def result(message: Message) -> dict[str, Any]:
    """One match: the message, its room, and the link that opens the room at it."""
    room_url = reverse("chat:room", args=[message.room.slug])
    return {
        "room": message.room.slug,
        "room_title": message.room.title,
        "seq": message.seq,
        "user": message.user.get_username(),
        "text": message.text,
        "created_at": message.created_at.isoformat(),
        "url": f"{room_url}#seq-{message.seq}",
    }
