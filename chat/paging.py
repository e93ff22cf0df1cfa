"""History paging for ``GET /chat/<slug>/messages/?before=<seq>&limit=<n>``.

Pages walk backwards by seq (keyset, never OFFSET), each page oldest first, in the shape
docs/protocol.md describes: ``{"messages": [...], "has_more": ..., "next_before": ...}``.
Parameters are read with chat/api.py's strict parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.http import JsonResponse

from . import protocol
from .api import parse_int
from .models import Message, Room


@dataclass(frozen=True)
class PageParams:
    before: int | None
    limit: int


def parse_page_params(
    query: Mapping[str, str], *, default_limit: int, max_limit: int
) -> PageParams:
    """Read ``before`` (optional, >= 1) and ``limit`` (>= 1, cut to ``max_limit``)."""
    before = query.get("before")
    limit = parse_int(query.get("limit"), "limit", default=default_limit, minimum=1)
    return PageParams(
        before=None if before is None else parse_int(before, "before", default=0, minimum=1),
        limit=min(limit, max_limit),
    )


def history_page(room: Room, params: PageParams) -> dict[str, Any]:
    """Messages with ``seq < before`` (all when None), the newest ``limit``, oldest first."""
    rows = Message.objects.filter(room=room)
    if params.before is not None:
        rows = rows.filter(seq__lt=params.before)
    # One row more than asked says whether an older page exists, whatever gaps deletes left.
    newest_first = list(rows.select_related("user").order_by("-seq")[: params.limit + 1])
    has_more = len(newest_first) > params.limit
    page = newest_first[: params.limit][::-1]
    return {
        "messages": [protocol.message_frame(m, room.slug, m.user) for m in page],
        "has_more": has_more,
        "next_before": page[0].seq if has_more else None,
    }


def page_response(room: Room, params: PageParams) -> JsonResponse:
    """The JSON response of one history page (runs the query: call from a thread)."""
    return JsonResponse(history_page(room, params), json_dumps_params={"ensure_ascii": False})


apage_response = sync_to_async(page_response)
