"""Search endpoints: JSON by default, an HTML page with ``format=html`` (docs/protocol.md,
"Search"). Thin over chat/search.py."""

from __future__ import annotations

import math
from typing import Any, cast

from asgiref.sync import async_to_sync
from django.contrib.auth.views import redirect_to_login
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from . import quotas, search, services
from .api import UNAVAILABLE_RETRY_SECONDS, BadParameter, error_response
from .conf import app_settings
from .models import Room


def _wants_html(request: HttpRequest) -> bool:
    # An explicit parameter rather than Accept: the same URL always answers the same type,
    # and a script's fetch never gets a page by accident.
    return request.GET.get("format") == "html"


def _respond(request: HttpRequest, rooms: Any, room: Room | None) -> HttpResponse:
    html = _wants_html(request)
    try:
        params = search.parse_search_params(
            request.GET,
            max_bytes=app_settings.SEARCH_MAX_QUERY_BYTES,
            default_limit=app_settings.SEARCH_PAGE_SIZE,
            max_limit=app_settings.SEARCH_PAGE_MAX,
        )
    except BadParameter as exc:
        if html:
            return _error_page(request, room, str(exc), 400)
        return error_response(400, "bad_request", str(exc))
    # Counted once the request is valid, before the query runs: a search can scan a room.
    # Only called for a logged-in user (both views check first).
    wait = async_to_sync(quotas.searches.hit)(cast(int, request.user.pk))
    if wait > 0:
        return _rate_limited(request, room, wait)
    try:
        page = search.search_page(rooms, params)
    except DatabaseError:
        response = error_response(503, "unavailable", "The database is unavailable.")
        response["Retry-After"] = str(UNAVAILABLE_RETRY_SECONDS)
        return response
    if html:
        return render(request, "chat/search.html", {"room": room, **page})
    return JsonResponse(page, json_dumps_params={"ensure_ascii": False})


def _error_page(request: HttpRequest, room: Room | None, error: str, status: int) -> HttpResponse:
    context = {"room": room, "q": request.GET.get("q", "")[:200], "error": error}
    return render(request, "chat/search.html", context, status=status)


def _rate_limited(request: HttpRequest, room: Room | None, wait: float) -> HttpResponse:
    limit = app_settings.SEARCH_RATE_LIMIT
    window = app_settings.SEARCH_RATE_LIMIT_WINDOW_SECONDS
    message = f"At most {limit} searches per {window:g} s; retry later."
    if _wants_html(request):
        response = _error_page(request, room, message, 429)
    else:
        response = error_response(429, "rate_limited", message)
    response["Retry-After"] = str(max(1, math.ceil(wait)))
    return response


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
