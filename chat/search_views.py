"""Search endpoints: JSON by default, an HTML page with ``format=html`` (docs/protocol.md,
"Search"). Thin over chat/search.py."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from . import search, services
from .conf import app_settings
from .models import Room
from .paging import UNAVAILABLE_RETRY_SECONDS, BadParameter, error_response


def _wants_html(request: HttpRequest) -> bool:
    # An explicit parameter rather than Accept: the same URL always answers the same type,
    # and a script's fetch never gets a page by accident.
    return request.GET.get("format") == "html"


def _respond(request: HttpRequest, rooms: Any, room: Room | None) -> HttpResponse:
    html = _wants_html(request)
    try:
        params = search.parse_search_params(
            request.GET,
            max_chars=app_settings.SEARCH_MAX_QUERY_CHARS,
            default_limit=app_settings.SEARCH_PAGE_SIZE,
            max_limit=app_settings.SEARCH_PAGE_MAX,
        )
    except BadParameter as exc:
        if html:
            context = {"room": room, "q": request.GET.get("q", "")[:200], "error": str(exc)}
            return render(request, "chat/search.html", context, status=400)
        return error_response(400, "bad_request", str(exc))
    try:
        page = search.search_page(rooms, params)
    except DatabaseError:
        response = error_response(503, "unavailable", "The database is unavailable.")
        response["Retry-After"] = str(UNAVAILABLE_RETRY_SECONDS)
        return response
    if html:
        return render(request, "chat/search.html", {"room": room, **page})
    return JsonResponse(page, json_dumps_params={"ensure_ascii": False})


def _unauthenticated(request: HttpRequest) -> HttpResponse:
    if _wants_html(request):
        return redirect_to_login(request.get_full_path())
    return error_response(401, "unauthenticated", "Log in first.")


@require_GET
def search_all(request: HttpRequest) -> HttpResponse:
    """Matches in every room the user may read."""
    if not request.user.is_authenticated:
        return _unauthenticated(request)
    return _respond(request, services.visible_rooms(request.user), None)


@require_GET
def search_room(request: HttpRequest, slug: str) -> HttpResponse:
    """Matches in one room (members of a private room only)."""
    if not request.user.is_authenticated:
        return _unauthenticated(request)
    try:
        room = services.get_room_for(request.user, slug)
    except services.RoomNotFound:
        if _wants_html(request):
            raise Http404("No such room.") from None
        return error_response(404, "not_found", "No such room.")
    except services.AccessDenied:
        if _wants_html(request):
            private = Room.objects.select_related("owner").get(slug=slug)
            return render(request, "chat/room_forbidden.html", {"room": private}, status=403)
        return error_response(403, "forbidden", "You are not a member of this room.")
    return _respond(request, Room.objects.filter(pk=room.pk), room)
