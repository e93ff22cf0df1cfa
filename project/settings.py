"""Settings for the demo host project.

Everything a deployment changes comes from the environment, with embedded defaults that need
no service at all (SQLite, the in-memory channel layer, the offline demo LLM):

- ``DATABASE_URL``: e.g. ``postgres://user:pass@host:5432/db``; SQLite file by default.
- ``REDIS_URL``: e.g. ``redis://127.0.0.1:6379/0``; switches the channel layer, presence and
  the per-user limits to Redis so several daphne processes serve the same rooms and users.
- ``DJANGO_SECRET_KEY``, ``DJANGO_DEBUG`` (``1``/``0``), ``DJANGO_ALLOWED_HOSTS`` (comma list).
- ``SQLITE_PATH``, ``SQLITE_TIMEOUT_SECONDS`` (busy timeout, default 20) and the ``CHAT_*``
  knobs at the end: the end-to-end tests start daphne with these to provoke limits and errors.

``chat`` and ``notifications`` never import this module: it is only one host for them.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be 1/0, true/false, yes/no or on/off, not {value!r}.")


DEBUG = env_bool("DJANGO_DEBUG", True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("Set DJANGO_SECRET_KEY when DJANGO_DEBUG is off.")
    # Only for local development: a fixed key so sessions survive `make run` restarts.
    SECRET_KEY = "django-insecure-local-development-only"  # noqa: S105

ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")
    if h.strip()
]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chat",
    "notifications",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "project.asgi.application"

SQLITE_PATH = os.environ.get("SQLITE_PATH", str(BASE_DIR / "db.sqlite3"))
DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    # Under ASGI every request thread holds its own connection: keep CONN_MAX_AGE at 0.
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            "OPTIONS": {
                # Writers take the lock at BEGIN, so concurrent senders queue on the busy
                # timeout instead of failing with "database is locked" on lock upgrade.
                "transaction_mode": "IMMEDIATE",
                "timeout": float(os.environ.get("SQLITE_TIMEOUT_SECONDS", "20")),
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # In-memory test database (shared cache across threads): parallel test runs in
            # one checkout cannot clobber each other's file.
            "TEST": {"NAME": os.environ.get("SQLITE_TEST_PATH") or None},
        }
    }

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    # Pub/sub layer: group_send is one PUBLISH whatever the group size, and it never silently
    # drops to a "full" channel. Delivery is at-most-once; clients recover from the database
    # by seq (docs/deployment.md has the measurements behind this choice).
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
    # Presence must be shared by every process: entries in one Redis sorted set per room.
    CHAT_PRESENCE_STORE = "chat.presence_stores.redis.RedisPresenceStore"
    CHAT_PRESENCE_REDIS_URL = REDIS_URL
    # Per-user limits (sockets, assistant replies and panel streams, notification streams)
    # must hold for the user across every process, not once per process.
    CHAT_REDIS_URL = REDIS_URL
    NOTIFICATIONS_REDIS_URL = REDIS_URL
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            # The default capacity (100) drops group messages to busy consumers in bursts.
            "CONFIG": {"capacity": 2000, "expiry": 60},
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:room_list"
LOGOUT_REDIRECT_URL = "login"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
    "loggers": {
        # One line per HTTP request and WebSocket event is noise at INFO.
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
    },
}

# The assistant (docs/settings.md): a real model when OPENAI_API_KEY is set (any
# OpenAI-compatible server with OPENAI_BASE_URL: vLLM, Ollama, llama.cpp), else the offline
# demo backend. The key only lives in this setting: it never reaches a page or a log line.
CHAT_LLM_API_KEY = os.environ.get("OPENAI_API_KEY", "")
CHAT_LLM_BASE_URL = os.environ.get("OPENAI_BASE_URL", "")
CHAT_LLM_MODEL = os.environ.get("OPENAI_MODEL", "") or "gpt-4o-mini"
CHAT_ASSISTANT_BACKEND = os.environ.get("CHAT_ASSISTANT_BACKEND", "") or (
    "chat.llm.openai_backend.OpenAIBackend" if CHAT_LLM_API_KEY else "chat.llm.demo.DemoBackend"
)
# Every app setting (docs/settings.md) can also come from an environment variable of the
# same name, e.g. CHAT_RATE_LIMIT_MESSAGES=20 or NOTIFICATIONS_KEEPALIVE_SECONDS=5 (the tests
# shorten timeouts this way). The apps' conf objects convert the strings; empty values are
# ignored, so unset variables leave the app defaults.
for _name, _value in os.environ.items():
    if _name.startswith(("CHAT_", "NOTIFICATIONS_")) and _value:
        globals()[_name] = _value
