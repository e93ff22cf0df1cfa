"""HTTP pages of the chat app: thin views over services."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.views.decorators.http import require_GET

from realtime_kit.metrics import ametrics_response

from . import protocol, services
from .api import BadParameter, error_response, parse_int, unavailable_on_database_error
from .conf import app_settings
from .export import RoomSnapshot, export_response, parse_format
from .models import Room
from .paging import apage_response, parse_page_params
from .presence_hub import get_hub
from .routing import room_ws_path


@login_required
def room_list(request: HttpRequest) -> HttpResponse:
    rooms = services.rooms_with_unread(request.user).order_by("slug")
    return render(request, "chat/room_list.html", {"rooms": rooms})


@login_required
def room_detail(request: HttpRequest, slug: str) -> HttpResponse:
    try:
        room = services.get_room_for(request.user, slug)
    except services.RoomNotFound:
        raise Http404("No such room.") from None
    except services.AccessDenied:
        raise PermissionDenied("This room is private.") from None
    return render(
        request,
        "chat/room.html",
        {
            "room": room,
            "max_text_length": app_settings.MAX_TEXT_LENGTH,
            "ws_path": room_ws_path(room.slug),
        },
    )


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
    return export_response(
        [RoomSnapshot(room.pk, room.slug, room.last_seq)],
        fmt,
        filename=f"{room.slug}-messages",
        after=after,
        page_size=app_settings.EXPORT_PAGE_SIZE,
        audit=f"user={user.pk} room={room.slug}",
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
