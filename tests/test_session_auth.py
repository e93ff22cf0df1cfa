"""realtime_kit.session_auth: the session user of a handshake, in one layer, like Channels'
AuthMiddlewareStack (which the e2e suite no longer goes through: get_asgi_application uses this)."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.auth import AuthMiddlewareStack
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from realtime_kit.session_auth import SessionAuthMiddleware, handshake_cookies

pytestmark = [pytest.mark.django_db(transaction=True)]


def _session_key(username: str) -> str:
    user = User.objects.create_user(username, password="pw-1")
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def _through(make: Any, cookie: str | None, **extra: Any) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.update(scope)

    headers = [(b"cookie", cookie.encode("latin-1"))] if cookie is not None else []
    scope = {"type": "websocket", "path": "/ws/chat/lobby/", "headers": headers, **extra}
    await make(inner)(scope, None, None)
    return seen


def _both() -> list[Any]:
    return [SessionAuthMiddleware, AuthMiddlewareStack]


@pytest.mark.parametrize("make", _both(), ids=["one layer", "channels stack"])
async def test_the_session_user_as_the_stack_resolves_it(make: Any) -> None:
    key = await sync_to_async(_session_key)("alice")
    name = settings.SESSION_COOKIE_NAME
    seen = await _through(make, f"theme=dark; {name}={key}; csrftoken=abc")
    assert seen["user"].is_authenticated and seen["user"].username == "alice"
    assert seen["session"].session_key == key
    # No cookie, an unknown session, a garbled header: anonymous, never an error.
    for cookie in (None, f"{name}=nope", "\x00;;==", f"{name}="):
        seen = await _through(make, cookie)
        assert not seen["user"].is_authenticated, cookie


@pytest.mark.parametrize("make", _both(), ids=["one layer", "channels stack"])
async def test_a_session_from_before_a_password_change_is_refused(make: Any) -> None:
    key = await sync_to_async(_session_key)("bob")

    def change_password() -> None:
        user = User.objects.get(username="bob")
        user.set_password("pw-2")
        user.save()

    await sync_to_async(change_password)()
    seen = await _through(make, f"{settings.SESSION_COOKIE_NAME}={key}")
    assert not seen["user"].is_authenticated


async def test_cookies_only_when_asked_and_an_authenticated_scope_passes_through() -> None:
    key = await sync_to_async(_session_key)("carol")
    cookie = f"theme=dark; {settings.SESSION_COOKIE_NAME}={key}"
    lean = await _through(SessionAuthMiddleware, cookie)
    assert "cookies" not in lean
    full = await _through(lambda inner: SessionAuthMiddleware(inner, cookies=True), cookie)
    assert full["cookies"] == {"theme": "dark", settings.SESSION_COOKIE_NAME: key}
    outer_user, outer_session = object(), object()
    passed = await _through(SessionAuthMiddleware, cookie, user=outer_user, session=outer_session)
    assert passed["user"] is outer_user and passed["session"] is outer_session


def test_cookie_headers_are_parsed_like_django_requests() -> None:
    scope = {"headers": [(b"cookie", b"a=1; b=2"), (b"x", b"y"), (b"cookie", b"b=3")]}
    assert handshake_cookies(scope) == {"a": "1", "b": "3"}
    assert handshake_cookies({"headers": []}) == {}
