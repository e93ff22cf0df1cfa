"""A community site that embeds the apps: e-mail logins, a URL prefix, its own layout."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = True  # static files through get_asgi_application(), as in development
SECRET_KEY = "community-host-for-tests-only"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

# Both apps, or one of them alone (tests/test_host_matrix.py).
REALTIME_APPS = [a for a in os.environ.get("COMMUNITY_APPS", "chat,notifications").split(",") if a]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "accounts",
    *REALTIME_APPS,
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

ROOT_URLCONF = "community_site.urls"
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
                "community_site.context.realtime_apps",
            ],
        },
    },
]

ASGI_APPLICATION = "community_site.asgi.application"
AUTH_USER_MODEL = "accounts.User"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("COMMUNITY_DB", str(BASE_DIR / "community.sqlite3")),
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
    }
}
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "/community/static/"
LOGIN_URL = "/community/accounts/login/"
LOGIN_REDIRECT_URL = "/community/"

# The apps' settings this site changes (docs/settings.md).
CHAT_WEBSOCKET_PREFIX = "community/ws/chat/"
CHAT_ASSISTANT_DEMO_DELAY_SECONDS = 0
# Notifications stored by another process (the smoke script) reach streams by this poll.
NOTIFICATIONS_POLL_SECONDS = 0.2
