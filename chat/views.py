"""HTTP pages of the chat app: thin views over services."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from . import services
from .conf import app_settings


@login_required
def room_list(request: HttpRequest) -> HttpResponse:
    rooms = services.visible_rooms(request.user).order_by("slug")
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
        {"room": room, "max_text_length": app_settings.MAX_TEXT_LENGTH},
    )
