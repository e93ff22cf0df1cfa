"""Wire format of the room JSON endpoints (docs/protocol.md, "Room endpoints"): request
bodies parsed and validated, rooms encoded. Pure: no database, no settings."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .api import BadParameter, parse_int

# Largest request body of a room endpoint, in bytes: the longest valid body (a 200-character
# title of 4-byte characters with JSON escapes) fits several times over.
MAX_BODY_BYTES = 8 * 1024

SLUG_MAX_CHARS = 64
TITLE_MAX_CHARS = 200
USERNAME_MAX_CHARS = 150

# Values of CHAT_ROOM_CREATORS.
CREATORS_AUTHENTICATED = "authenticated"
CREATORS_STAFF = "staff"
ROOM_CREATORS_CHOICES = (CREATORS_AUTHENTICATED, CREATORS_STAFF)

# Error codes of the room and search endpoints (with the HTTP status each comes with).
BAD_JSON = "bad_json"  # 400: the body is not a JSON object
BAD_REQUEST = "bad_request"  # 400: a field is missing, unknown or invalid (``field`` names it)
TOO_LARGE = "too_large"  # 413: the body is over MAX_BODY_BYTES
SLUG_TAKEN = "slug_taken"  # 409
ALREADY_MEMBER = "already_member"  # 409
OWNER_STAYS = "owner_stays"  # 409: the owner cannot be removed from their room
TOO_MANY_ROOMS = "too_many_rooms"  # 409: the creator owns CHAT_MAX_OWNED_ROOMS rooms already
NOT_FOUND = "not_found"  # 404: no such room, user or membership
FORBIDDEN = "forbidden"  # 403
UNAUTHENTICATED = "unauthenticated"  # 401
CSRF_FAILED = "csrf_failed"  # 403

_SLUG = re.compile(r"[-a-z0-9_]+")
# Any slug a room may have (the model's SlugField: admin-made rooms may have capitals).
_ANY_SLUG = re.compile(r"[-a-zA-Z0-9_]{1,64}")
# Slugs the chat URLs use themselves: such a room's page would be shadowed.
RESERVED_SLUGS = frozenset({"api", "search", "assistant"})


class BadBody(ValueError):
    """A request body the endpoint refuses; ``code`` and ``field`` go into the error."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


@dataclass(frozen=True)
class NewRoom:
    slug: str
    title: str
    is_private: bool


@dataclass(frozen=True)
class RoomChanges:
    title: str | None = None
    is_private: bool | None = None


def parse_object(body: bytes, allowed: frozenset[str]) -> dict[str, Any]:
    """The body as a JSON object with no keys outside ``allowed``."""
    if len(body) > MAX_BODY_BYTES:
        raise BadBody(TOO_LARGE, f"The body is over {MAX_BODY_BYTES} bytes.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadBody(BAD_JSON, "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadBody(BAD_JSON, "The body must be a JSON object.")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadBody(BAD_REQUEST, f"Unknown field {unknown[0][:40]!r}.", unknown[0][:40])
    return data


def _text(data: dict[str, Any], name: str, max_chars: int) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise BadBody(BAD_REQUEST, f"{name} must be a string.", name)
    value = value.strip()
    if not value:
        raise BadBody(BAD_REQUEST, f"{name} must not be empty.", name)
    if len(value) > max_chars:
        raise BadBody(BAD_REQUEST, f"{name} is longer than {max_chars} characters.", name)
    # Control and format characters (newlines, bidi overrides) have no place in a title
    # or a name shown in lists.
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
        raise BadBody(BAD_REQUEST, f"{name} contains control characters.", name)
    return value


def _flag(data: dict[str, Any], name: str) -> bool:
    value = data[name]
    if not isinstance(value, bool):
        raise BadBody(BAD_REQUEST, f"{name} must be true or false.", name)
    return value


def parse_slug(value: str) -> str:
    if len(value) > SLUG_MAX_CHARS or not _SLUG.fullmatch(value):
        raise BadBody(
            BAD_REQUEST,
            f"slug must be 1 to {SLUG_MAX_CHARS} lowercase letters, digits, '-' or '_'.",
            "slug",
        )
    if value in RESERVED_SLUGS:
        raise BadBody(BAD_REQUEST, f"The slug {value!r} is reserved.", "slug")
    return value


@dataclass(frozen=True)
class ListParams:
    after: str | None  # the page starts after this slug (keyset)
    limit: int


def parse_list_params(query: Any, *, page_size: int) -> ListParams:
    """``after`` and ``limit`` of ``GET /chat/api/rooms/``; ``limit`` is cut to ``page_size``."""
    after = query.get("after") or None
    if after is not None and not _ANY_SLUG.fullmatch(after):
        raise BadBody(BAD_REQUEST, "after must be a room slug.", "after")
    try:
        limit = parse_int(query.get("limit") or None, "limit", default=page_size, minimum=1)
    except BadParameter as exc:
        raise BadBody(BAD_REQUEST, str(exc), "limit") from None
    return ListParams(after, min(limit, page_size))


def parse_new_room(body: bytes) -> NewRoom:
    """``{"slug", "title", "is_private"?}`` of ``POST /chat/api/rooms/``."""
    data = parse_object(body, frozenset({"slug", "title", "is_private"}))
    slug = _text(data, "slug", SLUG_MAX_CHARS)
    is_private = _flag(data, "is_private") if "is_private" in data else False
    return NewRoom(parse_slug(slug), _text(data, "title", TITLE_MAX_CHARS), is_private)


def parse_room_changes(body: bytes) -> RoomChanges:
    """``{"title"?, "is_private"?}`` of ``PATCH /chat/api/rooms/<slug>/``, at least one."""
    data = parse_object(body, frozenset({"title", "is_private"}))
    if not data:
        raise BadBody(BAD_REQUEST, "Give title or is_private.")
    return RoomChanges(
        title=_text(data, "title", TITLE_MAX_CHARS) if "title" in data else None,
        is_private=_flag(data, "is_private") if "is_private" in data else None,
    )


def parse_invite(body: bytes) -> str:
    """The username of ``POST /chat/api/rooms/<slug>/members/``."""
    data = parse_object(body, frozenset({"username"}))
    return _text(data, "username", USERNAME_MAX_CHARS)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def room_body(
    *,
    slug: str,
    title: str,
    is_private: bool,
    owner: str | None,
    member_count: int,
    unread: int,
    last_message_at: datetime | None,
    url: str,
) -> dict[str, Any]:
    """One room as the room endpoints answer it."""
    return {
        "slug": slug,
        "title": title,
        "is_private": is_private,
        "owner": owner,
        "member_count": member_count,
        "unread": max(unread, 0),
        "last_message_at": _iso(last_message_at),
        "url": url,
    }
