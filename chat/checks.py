"""System checks: fail fast, with the fix in the message, when the host misconfigures us."""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.module_loading import import_string

from realtime_kit import checks as kit_checks
from realtime_kit.limit_stores import url_problem

from . import protocol
from .conf import app_settings
from .delivery.hub import MAX_UNMATCHED_ACKS
from .llm import checks as _assistant_checks  # noqa: F401  (registers them)
from .rooms_protocol import ROOM_CREATORS_CHOICES

# Settings that moved from notifications to chat with the mentions (0.1.0).
MOVED_SETTINGS = {
    "NOTIFICATIONS_MAX_MENTIONS": "CHAT_MAX_MENTIONS",
    "NOTIFICATIONS_MENTION_RATE_LIMIT": "CHAT_MENTION_RATE_LIMIT",
    "NOTIFICATIONS_MENTION_RATE_LIMIT_WINDOW_SECONDS": "CHAT_MENTION_RATE_LIMIT_WINDOW_SECONDS",
}


@register()
def check_chat_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    # A value that is not even of the setting's type: report only that, since every other
    # check below reads the settings and would raise.
    errors: list[CheckMessage] = kit_checks.setting_value_errors(app_settings, "chat.E010")
    if errors:
        return errors
    errors.extend(_check_presence_store())
    errors.extend(_check_websocket_prefix())
    positive = {
        "CHAT_HISTORY_LIMIT": app_settings.HISTORY_LIMIT,
        "CHAT_MAX_TEXT_LENGTH": app_settings.MAX_TEXT_LENGTH,
        "CHAT_MAX_FRAME_BYTES": app_settings.MAX_FRAME_BYTES,
        "CHAT_MAX_FRAMES_PER_MESSAGE": app_settings.MAX_FRAMES_PER_MESSAGE,
        "CHAT_RATE_LIMIT_MESSAGES": app_settings.RATE_LIMIT_MESSAGES,
        "CHAT_RATE_LIMIT_WINDOW_SECONDS": app_settings.RATE_LIMIT_WINDOW_SECONDS,
        "CHAT_REPLAY_BATCH_SIZE": app_settings.REPLAY_BATCH_SIZE,
        "CHAT_GROUP_COMMIT_MAX_MESSAGES": app_settings.GROUP_COMMIT_MAX_MESSAGES,
        "CHAT_MAX_PENDING_SENDS": app_settings.MAX_PENDING_SENDS,
        "CHAT_HISTORY_PAGE_SIZE": app_settings.HISTORY_PAGE_SIZE,
        "CHAT_HISTORY_PAGE_MAX": app_settings.HISTORY_PAGE_MAX,
        "CHAT_EXPORT_PAGE_SIZE": app_settings.EXPORT_PAGE_SIZE,
        "CHAT_EXPORT_MAX_CONCURRENT_PER_USER": app_settings.EXPORT_MAX_CONCURRENT_PER_USER,
        "CHAT_MAX_TEXT_BYTES": app_settings.MAX_TEXT_BYTES,
        "CHAT_MAX_SEND_BYTES": app_settings.MAX_SEND_BYTES,
        "CHAT_MAX_OUTBOUND_BYTES": app_settings.MAX_OUTBOUND_BYTES,
        "CHAT_MAX_INBOUND_BYTES": app_settings.MAX_INBOUND_BYTES,
        "CHAT_LEASE_TTL_SECONDS": app_settings.LEASE_TTL_SECONDS,
        "CHAT_MAX_SOCKETS_PER_USER": app_settings.MAX_SOCKETS_PER_USER,
        "CHAT_ASSISTANT_HEARTBEAT_SECONDS": app_settings.ASSISTANT_HEARTBEAT_SECONDS,
        "CHAT_ASSISTANT_TAKEOVER_SECONDS": app_settings.ASSISTANT_TAKEOVER_SECONDS,
        "CHAT_ROOM_LIST_POLL_SECONDS": app_settings.ROOM_LIST_POLL_SECONDS,
        "CHAT_ROOM_LIST_PAGE_SIZE": app_settings.ROOM_LIST_PAGE_SIZE,
        "CHAT_MAX_OWNED_ROOMS": app_settings.MAX_OWNED_ROOMS,
        "CHAT_SEARCH_PAGE_SIZE": app_settings.SEARCH_PAGE_SIZE,
        "CHAT_SEARCH_PAGE_MAX": app_settings.SEARCH_PAGE_MAX,
        "CHAT_SEARCH_MAX_QUERY_BYTES": app_settings.SEARCH_MAX_QUERY_BYTES,
        "CHAT_SEARCH_RATE_LIMIT": app_settings.SEARCH_RATE_LIMIT,
        "CHAT_SEARCH_RATE_LIMIT_WINDOW_SECONDS": app_settings.SEARCH_RATE_LIMIT_WINDOW_SECONDS,
        "CHAT_EDIT_RATE_LIMIT": app_settings.EDIT_RATE_LIMIT,
        "CHAT_EDIT_RATE_LIMIT_WINDOW_SECONDS": app_settings.EDIT_RATE_LIMIT_WINDOW_SECONDS,
        "CHAT_MENTION_RATE_LIMIT_WINDOW_SECONDS": app_settings.MENTION_RATE_LIMIT_WINDOW_SECONDS,
    }
    errors.extend(kit_checks.positive_errors(positive, "chat.E001"))
    # 0 turns mentions off; 0 sends every message of a group commit alone.
    non_negative: dict[str, float] = {
        "CHAT_MAX_MENTIONS": app_settings.MAX_MENTIONS,
        "CHAT_MENTION_RATE_LIMIT": app_settings.MENTION_RATE_LIMIT,
        "CHAT_LAYER_BATCH_MAX_BYTES": app_settings.LAYER_BATCH_MAX_BYTES,
    }
    errors.extend(kit_checks.non_negative_errors(non_negative, "chat.E005"))
    moved = [name for name in MOVED_SETTINGS if hasattr(settings, name)]
    if moved:
        errors.append(
            Warning(
                f"{', '.join(moved)} no longer apply: mentions are chat's.",
                hint="Rename them to " + ", ".join(MOVED_SETTINGS[name] for name in moved) + ".",
                id="chat.W003",
            )
        )
    if hasattr(settings, "CHAT_SEARCH_MAX_QUERY_CHARS"):
        errors.append(
            Warning(
                "CHAT_SEARCH_MAX_QUERY_CHARS no longer applies: the query limit counts bytes.",
                hint="Set CHAT_SEARCH_MAX_QUERY_BYTES (UTF-8 bytes, default 400) instead.",
                id="chat.W005",
            )
        )
    heartbeat = app_settings.ASSISTANT_HEARTBEAT_SECONDS
    if 0 < heartbeat and app_settings.ASSISTANT_TAKEOVER_SECONDS < 3 * heartbeat:
        errors.append(
            Error(
                "CHAT_ASSISTANT_TAKEOVER_SECONDS must be at least 3 x "
                f"CHAT_ASSISTANT_HEARTBEAT_SECONDS ({3 * heartbeat:g} s).",
                hint="Otherwise a reply whose process is alive but slowed down (a database "
                "hiccup) is taken over and ended as interrupted while it still runs.",
                id="chat.E020",
            )
        )
    if app_settings.MAX_PENDING_SENDS > MAX_UNMATCHED_ACKS:
        errors.append(
            Warning(
                f"CHAT_MAX_PENDING_SENDS is above {MAX_UNMATCHED_ACKS}, the acks the room hub "
                "keeps per socket until their messages arrive.",
                hint="A socket with more sends in flight gets some of its own messages up to "
                "1 s late (the hub waits for an ack it already forgot). Lower it.",
                id="chat.W004",
            )
        )
    if not getattr(settings, "CHANNEL_LAYERS", None):
        errors.append(
            Error(
                "chat needs a channel layer.",
                hint="Set CHANNEL_LAYERS, e.g. channels.layers.InMemoryChannelLayer for one "
                "process or channels_redis.pubsub.RedisPubSubChannelLayer for several.",
                id="chat.E002",
            )
        )
    if "channels" not in settings.INSTALLED_APPS:
        errors.append(Error("Add 'channels' to INSTALLED_APPS.", id="chat.E003"))
    if app_settings.MAX_TEXT_LENGTH * 4 > app_settings.MAX_FRAME_BYTES:
        errors.append(
            Warning(
                "CHAT_MAX_FRAME_BYTES is smaller than the longest allowed text could need "
                "in UTF-8 (4 bytes per character): long non-ASCII messages will be refused "
                "as too large instead of too long.",
                id="chat.W001",
            )
        )
    if app_settings.MAX_TEXT_BYTES + protocol.MESSAGE_OVERHEAD_BYTES > app_settings.MAX_SEND_BYTES:
        errors.append(
            Error(
                f"CHAT_MAX_TEXT_BYTES ({app_settings.MAX_TEXT_BYTES}) plus the rest of a message "
                f"frame ({protocol.MESSAGE_OVERHEAD_BYTES} bytes) does not fit in "
                f"CHAT_MAX_SEND_BYTES ({app_settings.MAX_SEND_BYTES}): such a message could "
                "never be delivered.",
                hint="Lower CHAT_MAX_TEXT_BYTES, or raise CHAT_MAX_SEND_BYTES together with "
                "the server's limit (daphne --websocket-max-message-size).",
                id="chat.E007",
            )
        )
    if app_settings.MAX_OUTBOUND_BYTES < app_settings.MAX_SEND_BYTES:
        errors.append(
            Error(
                "CHAT_MAX_OUTBOUND_BYTES is below CHAT_MAX_SEND_BYTES: one full message would "
                "close the socket as a slow consumer.",
                id="chat.E008",
            )
        )
    for name, millis in (
        ("CHAT_BATCH_WINDOW_MILLISECONDS", app_settings.BATCH_WINDOW_MILLISECONDS),
        ("CHAT_GAP_GRACE_MILLISECONDS", app_settings.GAP_GRACE_MILLISECONDS),
    ):
        if not 0 <= millis <= 1000:
            errors.append(Error(f"{name} must be within 0..1000, got {millis}.", id="chat.E009"))
    if app_settings.HISTORY_PAGE_SIZE > app_settings.HISTORY_PAGE_MAX:
        errors.append(
            Warning(
                f"CHAT_HISTORY_PAGE_SIZE ({app_settings.HISTORY_PAGE_SIZE}) is above "
                f"CHAT_HISTORY_PAGE_MAX ({app_settings.HISTORY_PAGE_MAX}): history pages "
                "requested without a limit are cut to the maximum.",
                id="chat.W301",
            )
        )
    errors.extend(_check_limits_store())
    errors.extend(_check_room_creators())
    return errors


def _check_room_creators() -> list[CheckMessage]:
    value = app_settings.ROOM_CREATORS
    if value in ROOM_CREATORS_CHOICES:
        return []
    return [
        Error(
            f"CHAT_ROOM_CREATORS must be one of {', '.join(ROOM_CREATORS_CHOICES)}, got {value!r}.",
            hint="'authenticated' lets any logged-in user create rooms, 'staff' only staff.",
            id="chat.E030",
        )
    ]


def _check_limits_store() -> list[CheckMessage]:
    problem = url_problem(app_settings.REDIS_URL)
    if problem is not None:
        return [
            Error(
                f"CHAT_REDIS_URL: {problem}.",
                hint="Use '' to count per-user limits in each process, or redis://host:6379/0.",
                id="chat.E004",
            )
        ]
    if not app_settings.REDIS_URL and _layers_cross_processes():
        return [
            Warning(
                "The channel layer is shared by several processes but CHAT_REDIS_URL is "
                "empty: per-user limits (sockets, assistant replies and panel streams) are "
                "counted in each process, so a user gets them once per process.",
                hint="Set CHAT_REDIS_URL to the Redis of the channel layer.",
                id="chat.W002",
            )
        ]
    return []


def _layers_cross_processes() -> bool:
    layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    return any("channels_redis" in str(layer.get("BACKEND", "")) for layer in layers.values())


def _check_presence_store() -> list[CheckMessage]:
    # A misspelt store fails only when the first socket joins a room (closed with 1011).
    from .presence_stores.base import BasePresenceStore

    path = app_settings.PRESENCE_STORE
    try:
        cls = import_string(path)
    except ImportError as exc:
        return [
            Error(
                f"CHAT_PRESENCE_STORE {path!r} cannot be imported: {exc}",
                hint="chat.presence_stores.memory.MemoryPresenceStore for one process, "
                "chat.presence_stores.redis.RedisPresenceStore for several.",
                id="chat.E011",
            )
        ]
    if not (isinstance(cls, type) and issubclass(cls, BasePresenceStore)):
        return [
            Error(
                f"CHAT_PRESENCE_STORE {path!r} is not a BasePresenceStore subclass.",
                hint="Subclass chat.presence_stores.base.BasePresenceStore.",
                id="chat.E014",
            )
        ]
    return []


def _check_websocket_prefix() -> list[CheckMessage]:
    prefix = app_settings.WEBSOCKET_PREFIX
    if prefix.startswith("/") or not prefix.endswith("/") or not _PREFIX.fullmatch(prefix):
        return [
            Error(
                f"CHAT_WEBSOCKET_PREFIX must be a path without a leading slash and with a "
                f"trailing one, e.g. 'ws/chat/' or 'community/ws/chat/'; got {prefix!r}.",
                id="chat.E012",
            )
        ]
    return []


# Path segments of URL-safe characters, each followed by a slash ("" is allowed: no prefix).
_PREFIX = re.compile(r"([-a-zA-Z0-9_.~]+/)*")


@register(deploy=True)
def check_chat_redis(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``check --deploy``: the Redis of the per-user limits and of presence answers."""
    if kit_checks.setting_value_errors(app_settings, "chat.E010"):
        return []
    urls = {"CHAT_REDIS_URL": app_settings.REDIS_URL}
    if "redis" in app_settings.PRESENCE_STORE.lower():
        urls["CHAT_PRESENCE_REDIS_URL"] = app_settings.PRESENCE_REDIS_URL
    errors: list[CheckMessage] = []
    for name, url in urls.items():
        problem = kit_checks.redis_problem(url) if url else None
        if problem is not None:
            errors.append(
                Error(
                    f"The Redis of {name} ({url}) does not answer: {problem}.",
                    hint="Start Redis, or fix the URL.",
                    id="chat.E013",
                )
            )
    return errors
