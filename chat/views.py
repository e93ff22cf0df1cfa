"""HTTP pages of the chat app: thin views over services."""

from __future__ import annotations

import uuid
from typing import cast
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET

from realtime_kit.metrics import ametrics_response

from . import protocol, quotas, rooms, services
from . import rooms_protocol as rp
from .api import BadParameter, error_response, parse_int, unavailable_on_database_error
from .conf import app_settings
from .export import (
    TOO_MANY_EXPORTS_RETRY_AFTER_SECONDS,
    RoomSnapshot,
    export_response,
    parse_format,
    too_many_exports_message,
)
from .models import Room
from .paging import apage_response, parse_page_params
from .presence_hub import get_hub
from .routing import room_ws_path


@login_required
def room_list(request: HttpRequest) -> HttpResponse:
    page_size = app_settings.ROOM_LIST_PAGE_SIZE
    try:
        params = rp.parse_list_params(request.GET, page_size=page_size)
    except rp.BadBody:
        # A hand-edited address: the first page, rather than an error page.
        params = rp.ListParams(None, page_size)
    page, next_after = rooms.room_page(request.user, params.after, params.limit)
    # The page polls the API for the same rooms it shows (badges, renames).
    api_url = reverse("chat:api_rooms")
    if params.after is not None:
        api_url += "?" + urlencode({"after": params.after})
    context = {
        "rooms": page,
        "after": params.after,
        "next_after": next_after,
        "api_url": api_url,
        "may_create": rooms.may_create(request.user),
        "poll_seconds": app_settings.ROOM_LIST_POLL_SECONDS,
    }
    return render(request, "chat/room_list.html", context)


@login_required
def room_detail(request: HttpRequest, slug: str) -> HttpResponse:
    try:
        room = services.get_room_for(request.user, slug)
    except services.RoomNotFound:
        raise Http404("No such room.") from None
    except services.AccessDenied:
        # A page that says why and whom to ask, rather than a bare 403.
        private = Room.objects.select_related("owner").get(slug=slug)
        return render(request, "chat/room_forbidden.html", {"room": private}, status=403)
    context = {
        "room": room,
        "max_text_length": app_settings.MAX_TEXT_LENGTH,
        "may_manage": rooms.may_manage(request.user, room),
        "is_member": rooms.is_member(request.user, room),
        "ws_path": room_ws_path(room.slug),
        "search_url": reverse("chat:room_search", args=[room.slug]),
        "api_url": reverse("chat:api_room", args=[room.slug]),
    }
    return render(request, "chat/room.html", context)


async def _api_room(request: HttpRequest, slug: str) -> Room | HttpResponse:
    """The room of a JSON/download endpoint, or its 401/404/403 error response."""
    user = await request.auser()
    if not user.is_authenticated:
        return error_response(401, "unauthenticated", "Log in first.")
    try:
        return await services.aget_room_for(user, slug)
    except services.RoomNotFound:
        return error_response(404, "not_found", "No such room.")
    except services.AccessDenied:
        return error_response(403, "forbidden", "You are not a member of this room.")


@require_GET
@unavailable_on_database_error
async def room_messages(request: HttpRequest, slug: str) -> HttpResponse:
    """One page of a room's history, older than ``before`` (docs/protocol.md)."""
    room = await _api_room(request, slug)
    if not isinstance(room, Room):
        return room
    try:
        params = parse_page_params(
            request.GET,
            default_limit=app_settings.HISTORY_PAGE_SIZE,
            max_limit=app_settings.HISTORY_PAGE_MAX,
        )
    except BadParameter as exc:
        return error_response(400, "bad_request", str(exc))
    return await apage_response(room, params)


@require_GET
@unavailable_on_database_error
async def export_messages(request: HttpRequest, slug: str) -> HttpResponseBase:
    """Every message of a room up to now, streamed as NDJSON or CSV (docs/protocol.md)."""
    room = await _api_room(request, slug)
    if not isinstance(room, Room):
        return room
    try:
        fmt = parse_format(request.GET.get("format"))
        after = parse_int(request.GET.get("after"), "after", default=0, minimum=0)
    except BadParameter as exc:
        return error_response(400, "bad_request", str(exc))
    user = await request.auser()
    lease = await quotas.exports.acquire(cast(int, user.pk), uuid.uuid4().hex)
    if lease is None:
        response = error_response(429, "too_many_exports", too_many_exports_message())
        response["Retry-After"] = str(TOO_MANY_EXPORTS_RETRY_AFTER_SECONDS)
        return response
    return export_response(
        [RoomSnapshot(room.pk, room.slug, room.last_seq)],
        fmt,
        filename=f"{room.slug}-messages",
        after=after,
        page_size=app_settings.EXPORT_PAGE_SIZE,
        audit=f"user={user.pk} room={room.slug}",
        lease=lease,
    )


@require_GET
@unavailable_on_database_error
async def room_presence(request: HttpRequest, slug: str) -> HttpResponse:
    """The room's presence as JSON, in the shape of the ``presence_state`` frame."""
    room = await _api_room(request, slug)
    if not isinstance(room, Room):
        return room
    state = await get_hub().snapshot(room.pk)
    frame = protocol.presence_state_frame(list(state.values()))
    return JsonResponse({"room": room.slug, "users": frame["users"]})


async def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics of this site's chat and notifications (staff, or the token)."""
    # Async: it runs on the server's event loop, whose tasks it counts.
    return await ametrics_response(request, app_settings.METRICS_TOKEN)
