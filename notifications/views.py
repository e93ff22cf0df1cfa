"""HTTP endpoints of the notifications app: thin transports over services and streams.

``GET stream/`` is the SSE stream; ``GET ""`` lists recent notifications as JSON;
``POST <id>/read/`` and ``POST read-all/`` mark them read (CSRF-protected). Anonymous callers
get 401 JSON, never a redirect to the login page: these are called from scripts.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, cast

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.http import require_GET, require_POST

from realtime_kit.responses import json_error
from realtime_kit.threads import detached

from . import protocol, services
from .conf import app_settings
from .streams import NotificationStream, TooManyStreams, reserve

if TYPE_CHECKING:
    from django.contrib.auth.models import User

MAX_LIST_LIMIT = 100
# Seconds a client refused for too many streams should wait before trying again.
TOO_MANY_STREAMS_RETRY_AFTER_SECONDS = 30


def _unauthenticated() -> JsonResponse:
    return json_error(401, protocol.UNAUTHENTICATED, "Log in to see your notifications.")


def api_login_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Like login_required, but answer 401 JSON instead of redirecting."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return _unauthenticated()
        return view(request, *args, **kwargs)

    return wrapper


def _user(request: HttpRequest) -> User:
    # Only called behind api_login_required.
    return cast("User", request.user)


@require_GET
async def stream(request: HttpRequest) -> HttpResponseBase:
    """The user's notifications as Server-Sent Events (docs/protocol.md)."""
    # Loaded on the shared thread, like every read of the stream: the request's own thread
    # would keep the session's database connection open for as long as the stream lasts.
    user = await detached(request.auser())
    if not user.is_authenticated:
        return _unauthenticated()
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        raw = request.GET.get("last_event_id")
    try:
        last_event_id = protocol.parse_last_event_id(raw)
    except ValueError as exc:
        return json_error(400, protocol.BAD_LAST_EVENT_ID, str(exc))
    try:
        lease = await reserve(user.pk)
    except TooManyStreams as exc:
        response = json_error(429, protocol.TOO_MANY_STREAMS, str(exc), limit=exc.limit)
        response["Retry-After"] = str(TOO_MANY_STREAMS_RETRY_AFTER_SECONDS)
        return response
    body = NotificationStream(user.pk, last_event_id, lease).events()
    # The generator's finally releases the lease; if the client leaves before the body starts
    # the generator never runs, and this releases it when the generator is collected.
    weakref.finalize(body, lease.release_soon)
    events = StreamingHttpResponse(body, content_type="text/event-stream")
    events["Cache-Control"] = "no-cache"
    events["X-Accel-Buffering"] = "no"
    return events


def _int_param(request: HttpRequest, name: str) -> int | None:
    value = request.GET.get(name)
    if value is None or value == "":
        return None
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"{name} must be a non-negative integer.")
    return int(value)


@require_GET
@api_login_required
def notification_list(request: HttpRequest) -> JsonResponse:
    """Recent notifications, newest first, and the unread count (for the bell's dropdown)."""
    try:
        limit = _int_param(request, "limit")
        before = _int_param(request, "before")
    except ValueError as exc:
        return json_error(400, protocol.BAD_PARAMETER, str(exc))
    limit = min(limit or app_settings.LIST_LIMIT, MAX_LIST_LIMIT)
    user = _user(request)
    state = services.unread_state(user.pk)
    rows = services.recent(user, limit, before)
    return JsonResponse(
        {
            "unread": state.count,
            "last_id": state.last_id,
            "notifications": [protocol.notification_payload(n) for n in rows],
        }
    )


def _unread_response(state: services.UnreadState) -> JsonResponse:
    return JsonResponse({"unread": state.count, "last_id": state.last_id})


@require_POST
@api_login_required
def mark_read(request: HttpRequest, notification_id: int) -> JsonResponse:
    try:
        state = services.mark_read(_user(request), notification_id)
    except services.NotificationNotFound:
        return json_error(404, "not_found", "No such notification.")
    return _unread_response(state)


@require_POST
@api_login_required
def mark_all_read(request: HttpRequest) -> JsonResponse:
    return _unread_response(services.mark_all_read(_user(request)))
