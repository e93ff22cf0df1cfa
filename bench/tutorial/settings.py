"""Minimal settings for the tutorial reference app: no database access on any benchmarked path.

AuthMiddlewareStack needs the auth and session apps; a client without a session cookie never
reaches the database, so an in-memory SQLite is enough.
"""

from __future__ import annotations

SECRET_KEY = "bench-tutorial-only"  # noqa: S105
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
INSTALLED_APPS = [
    "daphne",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "channels",
]
# startproject's list, minus the messages app this project does not install.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "bench.tutorial.urls"
ASGI_APPLICATION = "bench.tutorial.asgi.application"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
# The project's layer configuration, so that the comparison is about the delivery path and
# not about the tutorial's default capacity (100), which drops messages in these bursts.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels.layers.InMemoryChannelLayer",
        "CONFIG": {"capacity": 2000, "expiry": 60},
    }
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
