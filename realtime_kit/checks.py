"""System checks shared by both apps: the ASGI wiring, the channel layers, bad setting values.

Each mis-wiring here used to show only at runtime (issue 13): sockets closed with 4401, a
foreign Origin accepted, a handshake 500. ``manage.py check`` now names each with its fix.
Imported by ``chat.checks`` and ``notifications.checks``: registering twice is one check.
Nothing connects anywhere except ``check --deploy`` (``redis_problem``), never at import.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.module_loading import import_string

from .origin import CsrfOriginValidator

# Wrappers nest through one of these attributes (channels' BaseMiddleware: inner;
# ProtocolTypeRouter: application_mapping; origin validators and Django's static files
# handler: application). A bound stops a self-referencing wrapper from looping.
NESTING_ATTRIBUTES = ("inner", "application", "app")
MAX_WRAPPER_DEPTH = 50
REDIS_CHECK_TIMEOUT_SECONDS = 2.0
WIRING_HINT = (
    "Use application = realtime_kit.asgi.get_asgi_application(...) in your asgi.py "
    "(docs/embedding.md)."
)


def wrappers(app: Any) -> Iterator[Any]:
    """``app`` and every application it wraps, outermost first."""
    for _ in range(MAX_WRAPPER_DEPTH):
        if app is None:
            return
        yield app
        app = next((getattr(app, a) for a in NESTING_ATTRIBUTES if hasattr(app, a)), None)


def websocket_app(application: Any) -> Any | None:
    """What ``application`` runs for WebSockets: its ProtocolTypeRouter entry, or itself."""
    for wrapper in wrappers(application):
        mapping = getattr(wrapper, "application_mapping", None)
        if isinstance(mapping, dict):
            return mapping.get("websocket")
    return application


def routed_consumers(app: Any) -> Iterator[type]:
    """Consumer classes the URLRouters inside ``app`` route to (nested routers included)."""
    for wrapper in wrappers(app):
        for route in getattr(wrapper, "routes", None) or []:
            callback = getattr(route, "callback", None)
            consumer = getattr(callback, "consumer_class", None)
            if isinstance(consumer, type):
                yield consumer
            elif callback is not None and hasattr(callback, "routes"):
                yield from routed_consumers(callback)


def _load_application() -> tuple[Any | None, list[CheckMessage]]:
    path = getattr(settings, "ASGI_APPLICATION", None)
    if not path:
        return None, [
            Warning(
                "ASGI_APPLICATION is not set: the WebSocket wiring cannot be checked, and "
                "daphne's runserver cannot start.",
                hint="Set ASGI_APPLICATION = 'mysite.asgi.application'. " + WIRING_HINT,
                id="realtime_kit.W001",
            )
        ]
    try:
        return import_string(path), []
    except Exception as exc:  # the host's module: any error is a mis-wiring to report
        return None, [
            Error(
                f"ASGI_APPLICATION {path!r} cannot be imported: {type(exc).__name__}: {exc}",
                hint=WIRING_HINT,
                id="realtime_kit.E001",
            )
        ]


@register()
def check_asgi_application(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The WebSocket side of ASGI_APPLICATION has the auth, origin and chat routes."""
    application, errors = _load_application()
    if application is None:
        return errors
    errors.extend(_check_http(application))
    socket_app = websocket_app(application)
    if socket_app is None:
        return [
            Error(
                f"{settings.ASGI_APPLICATION} routes no WebSockets: every chat socket fails.",
                hint=WIRING_HINT,
                id="realtime_kit.E002",
            )
        ]
    from channels.auth import AuthMiddleware
    from channels.security.websocket import OriginValidator

    chain = list(wrappers(socket_app))
    if not any(isinstance(w, AuthMiddleware) for w in chain):
        errors.append(
            Error(
                f"The WebSockets of {settings.ASGI_APPLICATION} are not wrapped in "
                "channels.auth.AuthMiddlewareStack (or realtime_kit.session_auth."
                "SessionAuthMiddleware): every chat socket is closed with 4401.",
                hint=WIRING_HINT,
                id="realtime_kit.E003",
            )
        )
    if not any(isinstance(w, CsrfOriginValidator) for w in chain):
        if any(isinstance(w, OriginValidator) for w in chain):
            errors.append(
                Error(
                    f"The WebSockets of {settings.ASGI_APPLICATION} use Channels' origin "
                    "validator, which compares host names only: a page on another port or "
                    "scheme of an allowed host can open a socket with the user's session.",
                    hint="Use realtime_kit.origin.CsrfOriginValidator instead. " + WIRING_HINT,
                    id="realtime_kit.E008",
                )
            )
        else:
            errors.append(
                Error(
                    f"The WebSockets of {settings.ASGI_APPLICATION} are not wrapped in "
                    "realtime_kit.origin.CsrfOriginValidator: a page of any site can open a "
                    "socket with the user's session.",
                    hint=WIRING_HINT,
                    id="realtime_kit.E004",
                )
            )
    errors.extend(_check_chat_routed(socket_app))
    return errors


def http_app(application: Any) -> Any | None:
    """What ``application`` runs for HTTP: its ProtocolTypeRouter entry, or itself."""
    for wrapper in wrappers(application):
        mapping = getattr(wrapper, "application_mapping", None)
        if isinstance(mapping, dict):
            return mapping.get("http")
    return application


def _check_http(application: Any) -> list[CheckMessage]:
    from django.apps import apps
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    from .backpressure import DaphneBackpressure

    chain = list(wrappers(http_app(application)))
    warnings: list[CheckMessage] = []
    if chain and not any(isinstance(w, DaphneBackpressure) for w in chain):
        warnings.append(
            Warning(
                f"The HTTP side of {settings.ASGI_APPLICATION} has no DaphneBackpressure: under "
                "daphne an export or stream to a slow client is buffered whole in the process.",
                hint=WIRING_HINT,
                id="realtime_kit.W002",
            )
        )
    serves_static = any(isinstance(w, ASGIStaticFilesHandler) for w in chain)
    if settings.DEBUG and apps.is_installed("django.contrib.staticfiles") and not serves_static:
        warnings.append(
            Warning(
                f"DEBUG is on but {settings.ASGI_APPLICATION} serves no static files: daphne "
                "does not, so chat.js and bell.js answer 404 and the pages stay inert.",
                hint="get_asgi_application() serves them when DEBUG (or serve_static=True); "
                "in production let the proxy serve STATIC_ROOT.",
                id="realtime_kit.W003",
            )
        )
    return warnings


def _check_chat_routed(socket_app: Any) -> list[CheckMessage]:
    from django.apps import apps

    if not apps.is_installed("chat"):
        return []
    from chat.consumers import ChatConsumer

    if any(issubclass(c, ChatConsumer) for c in routed_consumers(socket_app)):
        return []
    return [
        Error(
            f"chat is installed but the WebSockets of {settings.ASGI_APPLICATION} route no "
            "ChatConsumer: room pages cannot connect.",
            hint="Add chat.routing.get_websocket_urlpatterns() to your URLRouter. " + WIRING_HINT,
            id="realtime_kit.E005",
        )
    ]


@register()
def check_channel_layers(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Every CHANNEL_LAYERS backend can be imported (a misspelt one is a handshake 500)."""
    errors: list[CheckMessage] = []
    layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    for alias, config in layers.items():
        backend = str((config or {}).get("BACKEND", ""))
        try:
            import_string(backend)
        except ImportError as exc:
            errors.append(
                Error(
                    f"CHANNEL_LAYERS[{alias!r}]['BACKEND'] {backend!r} cannot be imported: {exc}",
                    hint="channels.layers.InMemoryChannelLayer for one process, "
                    "channels_redis.pubsub.RedisPubSubChannelLayer for several.",
                    id="realtime_kit.E006",
                )
            )
    return errors


def redis_problem(url: str) -> str | None:
    """Why ``url``'s Redis does not answer PING (connects: only for ``check --deploy``)."""
    import redis

    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CHECK_TIMEOUT_SECONDS,
        socket_timeout=REDIS_CHECK_TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc).rstrip('.')}"
    finally:
        client.close()
    return None


def _layer_urls(config: dict[str, Any]) -> list[str]:
    hosts = (config.get("CONFIG") or {}).get("hosts") or []
    urls = []
    for host in hosts:
        if isinstance(host, str):
            urls.append(host)
        elif isinstance(host, dict) and isinstance(host.get("address"), str):
            urls.append(host["address"])
        elif isinstance(host, list | tuple) and len(host) == 2:
            urls.append(f"redis://{host[0]}:{host[1]}/0")
    return urls


@register(deploy=True)
def check_channel_layer_redis(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``check --deploy``: the Redis of every channels_redis layer answers."""
    errors: list[CheckMessage] = []
    layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    for alias, config in layers.items():
        if "channels_redis" not in str((config or {}).get("BACKEND", "")):
            continue
        for url in _layer_urls(config):
            problem = redis_problem(url)
            if problem is not None:
                errors.append(
                    Error(
                        f"The Redis of CHANNEL_LAYERS[{alias!r}] ({url}) does not answer: "
                        f"{problem}. Every chat handshake would fail with 500.",
                        hint="Start Redis, or fix CONFIG['hosts'].",
                        id="realtime_kit.E007",
                    )
                )
    return errors


def setting_value_errors(conf: Any, check_id: str) -> list[CheckMessage]:
    """An Error for each setting of the app's ``conf`` object whose value cannot be converted.

    Every typed property of the conf class is one setting (``conf.prefix + name``); a value
    such as ``"ten"`` for an int would otherwise raise inside the other checks, and
    ``manage.py check`` would print a traceback instead of the setting's name.
    """
    errors: list[CheckMessage] = []
    for name, attribute in vars(type(conf)).items():
        if not isinstance(attribute, property) or attribute.fget is None:
            continue
        try:
            attribute.fget(conf)
        except (TypeError, ValueError) as exc:
            kind = attribute.fget.__annotations__.get("return", "a value of another type")
            setting = conf.prefix + name
            errors.append(
                Error(
                    f"{setting} must be {_article(str(kind))}, got "
                    f"{getattr(settings, setting, None)!r} ({exc}).",
                    hint=f"Fix or remove {setting} (docs/settings.md lists its default).",
                    id=check_id,
                )
            )
    return errors


def _article(kind: str) -> str:
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean"}.get(
        kind, kind
    )


def positive_errors(values: dict[str, float], check_id: str) -> list[CheckMessage]:
    """``check_id`` for each setting (name: value) that must be positive and is not."""
    return [
        Error(f"{name} must be positive, got {value}.", id=check_id)
        for name, value in values.items()
        if value <= 0
    ]


def non_negative_errors(values: dict[str, float], check_id: str) -> list[CheckMessage]:
    """``check_id`` for each setting (name: value) that must not be negative and is."""
    return [
        Error(f"{name} must not be negative, got {value}.", id=check_id)
        for name, value in values.items()
        if value < 0
    ]
