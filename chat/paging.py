"""History paging for ``GET /chat/<slug>/messages/?before=<seq>&limit=<n>``.

Pages walk backwards by seq (keyset, never OFFSET), each page oldest first, in the shape
docs/protocol.md describes: ``{"messages": [...], "has_more": ..., "next_before": ...}``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from asgiref.sync import sync_to_async
from django.db import DatabaseError
from django.http import JsonResponse
from django.http.response import HttpResponseBase

from . import protocol
from .models import Message, Room

logger = logging.getLogger(__name__)

# Largest value of a PostgreSQL bigint: a larger query parameter would be a database error.
MAX_SEQ = 2**63 - 1

_DIGITS = re.compile(r"[0-9]{1,19}")


class BadParameter(ValueError):
    """A query parameter of an export or history request is unusable (HTTP 400)."""


def parse_int(value: str | None, name: str, *, default: int, minimum: int) -> int:
    """Parse a query parameter of ASCII digits between ``minimum`` and MAX_SEQ."""
    if value is None:
        return default
    # int() would also take " 5", "+5", "5_000" and non-ASCII digits.
    if not _DIGITS.fullmatch(value) or not minimum <= int(value) <= MAX_SEQ:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, "an integer")
        raise BadParameter(f"{name} must be {kind}, got {value[:20]!r}.")
    return int(value)


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


def error_response(status: int, code: str, message: str, field: str | None = None) -> JsonResponse:
    """``{"error": {"code": ..., "message": ...}}``, the error shape of the chat JSON views
    (with ``field`` naming the request field that was refused, when there is one)."""
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return JsonResponse({"error": error}, status=status)


# What a client is told to wait before retrying a request the database could not serve: a
# database restart takes seconds (docs/deployment.md, "Faults").
UNAVAILABLE_RETRY_SECONDS = 5

_View = TypeVar("_View", bound=Callable[..., Awaitable[HttpResponseBase]])


def unavailable_on_database_error(view: _View) -> _View:
    """Answer a database failure of an async JSON view with 503 ``unavailable`` (not a 500
    page): the client retries after ``Retry-After``. A failure once a streamed body has
    started ends the stream instead (the export is resumed with ``after=``)."""

    @functools.wraps(view)
    async def wrapper(*args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            return await view(*args, **kwargs)
        except DatabaseError:
            logger.warning("Database unavailable for %s", view.__name__, exc_info=True)
            response = error_response(
                503, protocol.UNAVAILABLE, "The database is unavailable; retry shortly."
            )
            response["Retry-After"] = str(UNAVAILABLE_RETRY_SECONDS)
            return response

    return cast(_View, wrapper)
