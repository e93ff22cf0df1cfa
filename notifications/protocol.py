"""The notifications wire format: SSE events, JSON payloads and the layer messages between
processes. Pure: no database, no settings, no I/O. docs/protocol.md describes the same events.

A notification's JSON is built from a per-notification prefix (its id) and a tail shared by
every recipient of one ``notify()`` call, so a broadcast to many users is encoded once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson

from realtime_kit import sse

# SSE event names.
EVENT_NOTIFICATION = "notification"
EVENT_UNREAD = "unread"
KEEPALIVE_COMMENT = "keepalive"

# Types of the channel-layer messages the per-process hub understands (an allowlist).
LAYER_BATCH = "notifications.batch"
LAYER_UNREAD = "notifications.unread"
LAYER_POLL = "notifications.poll"

# Error codes of the JSON error bodies.
UNAUTHENTICATED = "unauthenticated"
TOO_MANY_STREAMS = "too_many_streams"
BAD_LAST_EVENT_ID = "bad_last_event_id"
BAD_PARAMETER = "bad_parameter"

# Last-Event-ID is an id we sent: a positive database id, never longer than this.
MAX_EVENT_ID_DIGITS = 20


class NotificationLike(Protocol):
    id: Any
    title: str
    body: str
    url: str
    level: str
    created_at: datetime
    read_at: datetime | None


def _dumps(value: Any) -> str:
    # orjson, as chat's frames (docs/benchmarks.md, "Frame encodings"): the stdlib's compact
    # output (UTF-8 kept, minimal escapes), byte for byte, for a fraction of the CPU.
    text = orjson.dumps(value).decode("utf-8")
    # Valid JSON either way; escaped, no client that splits lines at Unicode separators
    # (U+2028/U+2029, as Python's str.splitlines does) can break an event apart.
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def notification_tail(
    title: str, body: str, url: str, level: str, created_at: datetime, read: bool
) -> str:
    """The JSON of a notification after its id: ``"title":…,"read":false}``."""
    fields = {
        "title": title,
        "body": body,
        "url": url,
        "level": level,
        "created_at": created_at.isoformat(),
        "read": read,
    }
    return _dumps(fields)[1:]


def notification_json(notification_id: int, tail: str) -> str:
    """The JSON object of one notification: its id first, then the shared tail."""
    return f'{{"id":{int(notification_id)},{tail}'


def notification_payload(n: NotificationLike) -> dict[str, Any]:
    """A stored notification as the JSON object clients get (list endpoint and stream)."""
    payload: dict[str, Any] = json.loads(notification_json(n.id, tail_of(n)))
    return payload


def tail_of(n: NotificationLike) -> str:
    return notification_tail(n.title, n.body, n.url, n.level, n.created_at, n.read_at is not None)


def unread_json(count: int, last_id: int) -> str:
    """``count`` unread notifications among those with ``id <= last_id``."""
    return _dumps({"count": int(count), "last_id": int(last_id)})


# --- SSE --------------------------------------------------------------------------------------


def notification_event(notification_id: int, data_json: str) -> str:
    return sse.encode_event(data_json, event=EVENT_NOTIFICATION, event_id=notification_id)


def unread_event(count: int, last_id: int) -> str:
    # No id: an unread event must not move the client's Last-Event-ID.
    return sse.encode_event(unread_json(count, last_id), event=EVENT_UNREAD)


def keepalive() -> str:
    return sse.encode_comment(KEEPALIVE_COMMENT)


def parse_last_event_id(value: str | None) -> int | None:
    """The notification id a client last received, or None when absent or empty.

    Raises ValueError for anything that is not an id we could have sent.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > MAX_EVENT_ID_DIGITS:
        raise ValueError("Last-Event-ID must be a notification id (a non-negative integer).")
    return int(value)


# --- layer messages between processes --------------------------------------------------------


@dataclass(frozen=True)
class BatchItem:
    user_id: int
    notification_id: int
    # The recipient's previous notification id (0 if none) when this one was stored: the
    # recipient has no notifications with ids between ``previous_id`` and ``notification_id``.
    previous_id: int


def batch_message(tail: str, items: Sequence[BatchItem]) -> dict[str, Any]:
    """One layer message for many recipients of the same notification content."""
    return {
        "type": LAYER_BATCH,
        "tail": tail,
        "items": [[i.user_id, i.notification_id, i.previous_id] for i in items],
    }


def unread_message(user_ids: Sequence[int]) -> dict[str, Any]:
    """Tell streams of these users that their unread count changed."""
    return {"type": LAYER_UNREAD, "users": [int(u) for u in user_ids]}


def poll_message() -> dict[str, Any]:
    """Ask every process to look in the database now (ids of new rows are unknown)."""
    return {"type": LAYER_POLL}


def parse_batch_items(raw: Any) -> list[BatchItem]:
    """Decode ``items`` of a batch message; raises ValueError when malformed."""
    if not isinstance(raw, list):
        raise ValueError("items must be a list")
    items = []
    for entry in raw:
        if not isinstance(entry, list | tuple) or len(entry) != 3:
            raise ValueError("an item is [user_id, notification_id, previous_id]")
        user_id, notification_id, previous_id = (int(v) for v in entry)
        items.append(BatchItem(user_id, notification_id, previous_id))
    return items
