"""The WebSocket origin rule in-process: handshake scopes through realtime_kit.origin.

The end-to-end tests (tests/test_e2e_origin.py) check it against a real daphne and Django's
CSRF check of a POST; these cover what daphne's scope cannot easily be made to carry: wss,
proxy headers, a Host outside ALLOWED_HOSTS.
"""

from __future__ import annotations

from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from realtime_kit.not_found import NOT_FOUND_CLOSE_CODE, websocket_not_found
from realtime_kit.origin import CsrfOriginValidator, origin_allowed

HOSTS = ["chat.example.com", ".example.org"]


def scope(
    origin: str | None,
    host: str = "chat.example.com",
    headers: tuple[tuple[str, str], ...] = (),
    **extra: Any,
) -> dict[str, Any]:
    """A WebSocket handshake scope as daphne builds it (lower-case byte header names)."""
    raw = [(b"host", host.encode())]
    if origin is not None:
        raw.append((b"origin", origin.encode()))
    raw += [(name.encode(), value.encode()) for name, value in headers]
    return {"type": "websocket", "path": "/ws/chat/lobby/", "headers": raw, **extra}


@override_settings(ALLOWED_HOSTS=HOSTS, CSRF_TRUSTED_ORIGINS=[])
@pytest.mark.parametrize(
    ("origin", "scheme", "expected"),
    [
        ("http://chat.example.com", "ws", True),
        ("http://chat.example.com", None, True),  # ASGI: no scheme means ws
        ("https://chat.example.com", "ws", False),
        ("https://chat.example.com", "wss", True),
        ("http://chat.example.com", "wss", False),
        ("http://chat.example.com:8000", "ws", False),
        ("http://CHAT.example.com", "ws", False),  # Django compares the origin verbatim
        ("http://other.example.org", "ws", False),  # allowed host, not this request's
        ("http://chat.example.com, http://chat.example.com", "ws", False),
        ("", "ws", False),
        (None, "ws", False),
    ],
)
def test_origin_must_be_the_requests_own(
    origin: str | None, scheme: str | None, expected: bool
) -> None:
    extra: dict[str, Any] = {"scheme": scheme} if scheme else {}
    assert origin_allowed(scope(origin, **extra)) is expected


@override_settings(ALLOWED_HOSTS=HOSTS)
def test_port_of_the_host_header_is_part_of_the_origin() -> None:
    assert origin_allowed(scope("http://chat.example.com:8000", host="chat.example.com:8000"))
    assert not origin_allowed(scope("http://chat.example.com", host="chat.example.com:8000"))


@override_settings(ALLOWED_HOSTS=HOSTS, CSRF_TRUSTED_ORIGINS=["https://app.example.net"])
def test_a_host_outside_allowed_hosts_is_refused_even_with_a_trusted_origin() -> None:
    assert origin_allowed(scope("https://app.example.net"))
    assert not origin_allowed(scope("http://evil.example", host="evil.example"))
    assert not origin_allowed(scope("https://app.example.net", host="evil.example"))


@override_settings(
    ALLOWED_HOSTS=HOSTS, CSRF_TRUSTED_ORIGINS=["https://*.example.net", "http://b.example.io:81"]
)
@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("https://a.example.net", True),
        ("https://a.b.example.net", True),
        ("https://example.net", True),  # is_same_domain: the domain itself matches too
        ("http://a.example.net", False),
        ("https://a.example.net.evil", False),
        ("http://b.example.io:81", True),
        ("http://b.example.io", False),
    ],
)
def test_csrf_trusted_origins_with_wildcards(origin: str, expected: bool) -> None:
    assert origin_allowed(scope(origin)) is expected


@override_settings(ALLOWED_HOSTS=HOSTS, SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"))
def test_secure_proxy_ssl_header_makes_the_handshake_https() -> None:
    behind_tls = (("x-forwarded-proto", "https"),)
    assert origin_allowed(scope("https://chat.example.com", headers=behind_tls))
    assert not origin_allowed(scope("http://chat.example.com", headers=behind_tls))
    plain = (("x-forwarded-proto", "http"),)
    assert origin_allowed(scope("http://chat.example.com", headers=plain))


@override_settings(ALLOWED_HOSTS=HOSTS)
def test_forwarded_proto_is_ignored_unless_configured() -> None:
    spoofed = (("x-forwarded-proto", "https"),)
    assert not origin_allowed(scope("https://chat.example.com", headers=spoofed))
    assert origin_allowed(scope("http://chat.example.com", headers=spoofed))


@override_settings(ALLOWED_HOSTS=HOSTS, USE_X_FORWARDED_HOST=True)
def test_use_x_forwarded_host_applies_as_for_http() -> None:
    proxied = (("x-forwarded-host", "chat.example.com"),)
    assert origin_allowed(scope("http://chat.example.com", host="10.0.0.5:8001", headers=proxied))


# --- as ASGI middleware ----------------------------------------------------------------------


@override_settings(ALLOWED_HOSTS=HOSTS)
async def test_validator_denies_the_handshake_or_passes_it_on() -> None:
    app = CsrfOriginValidator(websocket_not_found)
    headers = [(b"host", b"chat.example.com"), (b"origin", b"http://chat.example.com:1")]
    refused = WebsocketCommunicator(app, "/ws/x/", headers=headers)
    connected, _ = await refused.connect(timeout=5)
    assert not connected
    headers[1] = (b"origin", b"http://chat.example.com")
    passed = WebsocketCommunicator(app, "/ws/x/", headers=headers)
    connected, _ = await passed.connect(timeout=5)
    assert connected
    assert await passed.receive_output(timeout=5) == {
        "type": "websocket.close",
        "code": NOT_FOUND_CLOSE_CODE,
    }
    await passed.wait(timeout=5)
