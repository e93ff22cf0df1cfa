"""The one-call ASGI wiring and the system checks that catch each hand-written mis-wiring."""

from __future__ import annotations

from typing import Any

import pytest
from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from channels.testing import WebsocketCommunicator
from django.core.asgi import get_asgi_application as django_asgi_application
from django.core.checks import CheckMessage
from django.test import override_settings

from chat.backpressure import DaphneBackpressure
from chat.checks import check_chat_redis, check_chat_settings
from chat.llm.checks import check_assistant_settings
from chat.routing import get_websocket_urlpatterns, room_ws_path
from notifications.checks import check_notifications_redis, check_notifications_settings
from realtime_kit import checks
from realtime_kit.asgi import get_asgi_application
from realtime_kit.not_found import not_found_route
from realtime_kit.origin import CsrfOriginValidator

_django = DaphneBackpressure(django_asgi_application())
# Hand-written wirings, each missing one part (referenced by ASGI_APPLICATION below).
NO_AUTH = ProtocolTypeRouter(
    {"http": _django, "websocket": CsrfOriginValidator(URLRouter(get_websocket_urlpatterns()))}
)
NO_ORIGIN = ProtocolTypeRouter(
    {"http": _django, "websocket": AuthMiddlewareStack(URLRouter(get_websocket_urlpatterns()))}
)
HOST_ONLY_ORIGIN = ProtocolTypeRouter(
    {
        "http": _django,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(get_websocket_urlpatterns()))
        ),
    }
)
NO_CHAT_ROUTE = ProtocolTypeRouter(
    {
        "http": _django,
        "websocket": CsrfOriginValidator(AuthMiddlewareStack(URLRouter([not_found_route()]))),
    }
)
HTTP_ONLY = ProtocolTypeRouter({"http": _django})
WIRED = get_asgi_application()
NO_STATIC = get_asgi_application(serve_static=False)
BARE_HTTP = ProtocolTypeRouter(
    {"http": django_asgi_application(), "websocket": WIRED.application_mapping["websocket"]}
)


def ids(messages: list[CheckMessage]) -> list[str]:
    return sorted(str(m.id) for m in messages)


@pytest.mark.parametrize(
    ("application", "expected"),
    [
        ("tests.test_wiring.WIRED", []),
        ("project.asgi.application", []),
        ("tests.test_wiring.NO_AUTH", ["realtime_kit.E003"]),
        ("tests.test_wiring.NO_ORIGIN", ["realtime_kit.E004"]),
        ("tests.test_wiring.HOST_ONLY_ORIGIN", ["realtime_kit.E008"]),
        ("tests.test_wiring.NO_CHAT_ROUTE", ["realtime_kit.E005"]),
        ("tests.test_wiring.HTTP_ONLY", ["realtime_kit.E002"]),
        ("tests.test_wiring.MISSPELT", ["realtime_kit.E001"]),
        ("", ["realtime_kit.W001"]),
    ],
)
def test_the_asgi_check_names_each_missing_part(application: str, expected: list[str]) -> None:
    with override_settings(ASGI_APPLICATION=application):
        found = checks.check_asgi_application()
    assert ids(found) == expected
    assert all("docs/embedding.md" in (m.hint or "") for m in found)


def test_the_http_side_is_checked_for_backpressure_and_static_files_in_debug() -> None:
    with override_settings(ASGI_APPLICATION="tests.test_wiring.BARE_HTTP"):
        assert ids(checks.check_asgi_application()) == ["realtime_kit.W002"]
        with override_settings(DEBUG=True):
            found = ids(checks.check_asgi_application())
    assert found == ["realtime_kit.W002", "realtime_kit.W003"]
    with override_settings(ASGI_APPLICATION="tests.test_wiring.NO_STATIC", DEBUG=True):
        assert ids(checks.check_asgi_application()) == ["realtime_kit.W003"]
    with override_settings(ASGI_APPLICATION="project.asgi.application", DEBUG=True):
        assert ids(checks.check_asgi_application()) == []


def test_the_origin_error_says_why_channels_validator_is_not_enough() -> None:
    with override_settings(ASGI_APPLICATION="tests.test_wiring.HOST_ONLY_ORIGIN"):
        (error,) = checks.check_asgi_application()
    assert "another port or scheme" in error.msg


def test_a_misspelt_channel_layer_is_an_error() -> None:
    layers = {"default": {"BACKEND": "channels.layers.InMemoryChanelLayer"}}
    with override_settings(CHANNEL_LAYERS=layers):
        assert ids(checks.check_channel_layers()) == ["realtime_kit.E006"]
    assert checks.check_channel_layers() == []


def test_a_misspelt_presence_store_is_an_error() -> None:
    with override_settings(CHAT_PRESENCE_STORE="chat.presence_stores.memory.MemoryStore"):
        assert "chat.E011" in ids(check_chat_settings())
    with override_settings(CHAT_PRESENCE_STORE="chat.models.Room"):
        assert "chat.E014" in ids(check_chat_settings())
    assert not {"chat.E011", "chat.E014"} & set(ids(check_chat_settings()))


@pytest.mark.parametrize("prefix", ["/ws/chat/", "ws/chat", "ws chat/", "ws//"])
def test_a_malformed_websocket_prefix_is_an_error(prefix: str) -> None:
    with override_settings(CHAT_WEBSOCKET_PREFIX=prefix):
        assert "chat.E012" in ids(check_chat_settings())


@pytest.mark.parametrize(
    ("setting", "value", "check", "check_id"),
    [
        ("CHAT_HISTORY_LIMIT", "ten", check_chat_settings, "chat.E010"),
        ("CHAT_RATE_LIMIT_WINDOW_SECONDS", "5s", check_chat_settings, "chat.E010"),
        ("CHAT_ASSISTANT_MAX_MESSAGES", [50], check_chat_settings, "chat.E010"),
        ("CHAT_LLM_MAX_RETRIES", "one", check_chat_settings, "chat.E010"),
        ("NOTIFICATIONS_POLL_SECONDS", "often", check_notifications_settings, "notifications.E003"),
        (
            "NOTIFICATIONS_STREAM_QUEUE_LIMIT",
            None,
            check_notifications_settings,
            "notifications.E003",
        ),
        ("CHAT_MAX_MENTIONS", None, check_chat_settings, "chat.E010"),
    ],
)
def test_a_value_of_the_wrong_type_is_an_error_not_a_traceback(
    setting: str, value: Any, check: Any, check_id: str
) -> None:
    with override_settings(**{setting: value}):
        found = check()
        # The other checks reading the same settings stay quiet instead of raising.
        assert check_assistant_settings() == []
        assert check_chat_redis() == []
        assert check_notifications_redis() == []
    assert [(m.id, setting in m.msg) for m in found] == [(check_id, True)]


def test_unreachable_redis_is_reported_only_by_the_deploy_checks() -> None:
    from django.core import checks as django_checks

    dead = "redis://127.0.0.1:1/0"
    layers = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [dead]},
        }
    }
    with override_settings(
        CHANNEL_LAYERS=layers,
        CHAT_REDIS_URL=dead,
        CHAT_PRESENCE_STORE="chat.presence_stores.redis.RedisPresenceStore",
        CHAT_PRESENCE_REDIS_URL=dead,
        NOTIFICATIONS_REDIS_URL=dead,
    ):
        plain = ids(django_checks.run_checks(include_deployment_checks=False))
        deploy = ids(django_checks.run_checks(include_deployment_checks=True))
    unreachable = ["chat.E013", "notifications.E004", "realtime_kit.E007"]
    assert [i for i in plain if i in unreachable] == []
    assert sorted({i for i in deploy if i in unreachable}) == unreachable
    assert deploy.count("chat.E013") == 2  # the limits' Redis and the presence Redis


def test_redis_problem_is_none_for_a_live_redis(redis_server: Any) -> None:
    assert checks.redis_problem(redis_server.url) is None


def test_the_prefix_moves_the_route_and_the_page_path() -> None:
    with override_settings(CHAT_WEBSOCKET_PREFIX="community/ws/chat/"):
        (route,) = get_websocket_urlpatterns()
        assert room_ws_path("lobby") == "/community/ws/chat/lobby/"
        assert route.pattern.regex.match("community/ws/chat/lobby/")
        assert not route.pattern.regex.match("ws/chat/lobby/")
    assert room_ws_path("lobby") == "/ws/chat/lobby/"


@pytest.mark.django_db(transaction=True)
async def test_the_wired_application_serves_chat_sockets_with_the_session_user() -> None:
    from asgiref.sync import sync_to_async
    from django.contrib.auth import get_user_model
    from django.test import Client

    from chat.models import Room

    await Room.objects.acreate(slug="lobby", title="Lobby")
    user = await get_user_model().objects.acreate(username="dora")
    client = Client()
    await sync_to_async(client.force_login)(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    headers = [(b"cookie", cookie.encode()), (b"origin", b"http://testserver")]
    headers.append((b"host", b"testserver"))
    comm = WebsocketCommunicator(WIRED, "/ws/chat/lobby/", headers=headers)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    await comm.disconnect()
    # A foreign Origin is denied before the consumer runs.
    foreign = [(b"cookie", cookie.encode()), (b"origin", b"http://evil.example")]
    comm = WebsocketCommunicator(WIRED, "/ws/chat/lobby/", headers=[*foreign, headers[-1]])
    connected, _ = await comm.connect(timeout=5)
    assert not connected


def test_static_files_are_served_only_when_asked_or_in_debug() -> None:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    def serves_static(app: Any) -> bool:
        http = app.application_mapping["http"]
        return any(isinstance(w, ASGIStaticFilesHandler) for w in checks.wrappers(http))

    assert serves_static(get_asgi_application(serve_static=True))
    assert not serves_static(get_asgi_application(serve_static=False))
    with override_settings(DEBUG=True):
        assert serves_static(get_asgi_application())


def test_the_settings_module_is_a_default_the_environment_overrides(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    from tests.servers import REPO_ROOT

    probe = (
        "import os; from realtime_kit.asgi import get_asgi_application; "
        "get_asgi_application('project.settings'); print(os.environ['DJANGO_SETTINGS_MODULE'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "project.settings", out.stderr[-2000:]
