"""JSON endpoints to create and run rooms from host pages (docs/protocol.md, "Room
endpoints"): session auth, CSRF answered as JSON, thin over chat/rooms.py."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from . import rooms, services
from . import rooms_protocol as rp
from .api import UNAVAILABLE_RETRY_SECONDS, error_response
from .conf import app_settings
from .models import Room

_View = Callable[..., HttpResponse]

_SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")


class _JsonCsrf(CsrfViewMiddleware):
    """Django's CSRF check, refusing with a JSON error instead of the HTML failure page: a
    host page's script can tell a stale token from other refusals. ``_reject`` is the
    middleware's one refusal hook (private, unchanged since Django 1.x; the CSRF tests in
    tests/test_rooms.py fail if it changes)."""

    def _reject(self, request: HttpRequest, reason: str) -> HttpResponse:
        return error_response(403, rp.CSRF_FAILED, f"CSRF check failed: {reason}")


def _no_response(request: HttpRequest) -> HttpResponse:
    raise AssertionError("only the checks of the middleware run")


def json_api(methods: tuple[str, ...]) -> Callable[[_View], _View]:
    """Session auth (401 JSON), allowed methods (405), CSRF (403 JSON ``csrf_failed``) and
    database outages (503 ``unavailable``) for a room endpoint."""

    def decorate(view: _View) -> _View:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                response = error_response(405, "method_not_allowed", "Method not allowed.")
                response["Allow"] = ", ".join(methods)
                return response
            if request.method not in _SAFE_METHODS:
                checker = _JsonCsrf(_no_response)
                checker.process_request(request)
                refused = checker.process_view(request, view, args, kwargs)
                if refused is not None:
                    return refused
            if not request.user.is_authenticated:
                return error_response(401, rp.UNAUTHENTICATED, "Log in first.")
            try:
                return view(request, *args, **kwargs)
            except rp.BadBody as exc:
                status = 413 if exc.code == rp.TOO_LARGE else 400
                return error_response(status, exc.code, str(exc), exc.field)
            except services.RoomNotFound:
                return error_response(404, rp.NOT_FOUND, "No such room.")
            except services.AccessDenied:
                return error_response(403, rp.FORBIDDEN, "You may not do this in this room.")
            except DatabaseError:
                response = error_response(503, "unavailable", "The database is unavailable.")
                response["Retry-After"] = str(UNAVAILABLE_RETRY_SECONDS)
                return response

        # The middleware's own check would answer with its HTML page; ours runs instead.
        return csrf_exempt(wrapper)

    return decorate


def _body(request: HttpRequest) -> bytes:
    """The request body, refused unread when its declared length is over the bound."""
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > rp.MAX_BODY_BYTES:
        raise rp.BadBody(rp.TOO_LARGE, f"The body is over {rp.MAX_BODY_BYTES} bytes.")
    return request.body


def _room_json(room: Room) -> dict[str, Any]:
    """A room annotated by rooms.room_list / rooms.room_info, as JSON."""
    return rp.room_body(
        slug=room.slug,
        title=room.title,
        is_private=room.is_private,
        owner=room.owner.get_username() if room.owner is not None else None,
        member_count=room.member_count,  # type: ignore[attr-defined]
        unread=room.unread,  # type: ignore[attr-defined]
        last_message_at=room.last_message_at,  # type: ignore[attr-defined]
        url=reverse("chat:room", args=[room.slug]),
    )


def _json(data: dict[str, Any], status: int = 200) -> JsonResponse:
    return JsonResponse(data, status=status, json_dumps_params={"ensure_ascii": False})


@json_api(("GET", "POST"))
def rooms_collection(request: HttpRequest) -> HttpResponse:
    """GET: the rooms the user may read, with unread counts. POST: create a room."""
    if request.method == "GET":
        params = rp.parse_list_params(request.GET, page_size=app_settings.ROOM_LIST_PAGE_SIZE)
        page, next_after = rooms.room_page(request.user, params.after, params.limit)
        return _json(
            {
                "rooms": [_room_json(room) for room in page],
                "may_create": rooms.may_create(request.user),
                "has_more": next_after is not None,
                "next_after": next_after,
            }
        )
    if not rooms.may_create(request.user):
        return error_response(403, rp.FORBIDDEN, "You may not create rooms.")
    new = rp.parse_new_room(_body(request))
    try:
        room = rooms.create_room(request.user, new)  # type: ignore[arg-type]
    except rooms.SlugTaken:
        return error_response(409, rp.SLUG_TAKEN, "A room with this slug exists.", "slug")
    except rooms.TooManyRooms:
        return error_response(409, rp.TOO_MANY_ROOMS, "You own as many rooms as allowed.")
    return _json(_room_json(rooms.room_info(request.user, room)), status=201)


@json_api(("GET", "PATCH"))
def room_item(request: HttpRequest, slug: str) -> HttpResponse:
    """GET: the room with its members. PATCH: rename it or change its privacy."""
    room = rooms.get_room_to_manage(request.user, slug)
    if request.method == "PATCH":
        if not rooms.may_manage(request.user, room):
            return error_response(403, rp.FORBIDDEN, "Only the owner or staff change a room.")
        room = rooms.update_room(room, rp.parse_room_changes(_body(request)))
    data = _room_json(rooms.room_info(request.user, room))
    data["members"] = rooms.members(room)
    data["may_manage"] = rooms.may_manage(request.user, room)
    return _json(data)


@json_api(("POST",))
def room_members(request: HttpRequest, slug: str) -> HttpResponse:
    """POST ``{"username"}``: invite a user (owner or staff)."""
    room = rooms.get_room_to_manage(request.user, slug)
    if not rooms.may_manage(request.user, room):
        return error_response(403, rp.FORBIDDEN, "Only the owner or staff invite members.")
    username = rp.parse_invite(_body(request))
    try:
        rooms.add_member(room, username)
    except rooms.UserNotFound:
        return error_response(404, rp.NOT_FOUND, "No such user.", "username")
    except rooms.AlreadyMember:
        return error_response(409, rp.ALREADY_MEMBER, "Already a member.", "username")
    return _json({"room": room.slug, "username": username}, status=201)


@json_api(("DELETE",))
def room_member(request: HttpRequest, slug: str, username: str) -> HttpResponse:
    """DELETE: remove a member (owner or staff), or leave (the member themselves)."""
    room = rooms.get_room_to_manage(request.user, slug)
    try:
        rooms.remove_member(request.user, room, username)
    except rooms.NotMember:
        return error_response(404, rp.NOT_FOUND, "No such member.")
    except rooms.OwnerStays:
        return error_response(409, rp.OWNER_STAYS, "The owner stays in their room.")
    return HttpResponse(status=204)
