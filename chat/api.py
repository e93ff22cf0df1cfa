"""Request parsing and error answers of chat's JSON endpoints (history, export, presence,
the assistant panel): query parameters read strictly, errors in one shape.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from django.db import DatabaseError
from django.http import JsonResponse
from django.http.response import HttpResponseBase

from realtime_kit.responses import json_error

from . import protocol

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


def error_response(status: int, code: str, message: str, field: str | None = None) -> JsonResponse:
    """``{"error": {"code": ..., "message": ...}}``, the error shape of the chat JSON views
    (with ``field`` naming the request field that was refused, when there is one)."""
    if field is None:
        return json_error(status, code, message)
    return json_error(status, code, message, field=field)


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
