"""System checks: fail fast, with the fix in the message, when the host misconfigures us."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.db import connections

from realtime_kit import checks as kit_checks
from realtime_kit.limit_stores import url_problem

from .conf import app_settings


@register()
def check_notifications_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    # A value not of the setting's type: report only that (the checks below would raise).
    errors: list[CheckMessage] = kit_checks.setting_value_errors(app_settings, "notifications.E003")
    if errors:
        return errors
    positive = {
        "NOTIFICATIONS_KEEPALIVE_SECONDS": app_settings.KEEPALIVE_SECONDS,
        "NOTIFICATIONS_POLL_SECONDS": app_settings.POLL_SECONDS,
        "NOTIFICATIONS_MAX_STREAMS_PER_USER": app_settings.MAX_STREAMS_PER_USER,
        "NOTIFICATIONS_REPLAY_BATCH_SIZE": app_settings.REPLAY_BATCH_SIZE,
        "NOTIFICATIONS_BATCH_SIZE": app_settings.BATCH_SIZE,
        "NOTIFICATIONS_LIST_LIMIT": app_settings.LIST_LIMIT,
        "NOTIFICATIONS_STREAM_QUEUE_LIMIT": app_settings.STREAM_QUEUE_LIMIT,
        "NOTIFICATIONS_LEASE_TTL_SECONDS": app_settings.LEASE_TTL_SECONDS,
    }
    errors.extend(kit_checks.positive_errors(positive, "notifications.E001"))
    if app_settings.RETRY_MILLISECONDS < 0:
        errors.append(
            Error("NOTIFICATIONS_RETRY_MILLISECONDS must not be negative.", id="notifications.E005")
        )
    layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    if app_settings.CHANNEL_LAYER not in layers:
        errors.append(
            Warning(
                f"CHANNEL_LAYERS has no {app_settings.CHANNEL_LAYER!r} layer: notifications "
                "reach open streams only through the database poll "
                "(NOTIFICATIONS_POLL_SECONDS).",
                hint="Configure CHANNEL_LAYERS (channels_redis.pubsub.RedisPubSubChannelLayer "
                "for several processes) or set NOTIFICATIONS_CHANNEL_LAYER.",
                id="notifications.W001",
            )
        )
    errors.extend(_check_limits_store(layers))
    errors.extend(_check_database())
    return errors


def _check_limits_store(layers: dict[str, Any]) -> list[CheckMessage]:
    problem = url_problem(app_settings.REDIS_URL)
    if problem is not None:
        return [
            Error(
                f"NOTIFICATIONS_REDIS_URL: {problem}.",
                hint="Use '' to count the stream cap in each process, or redis://host:6379/0.",
                id="notifications.E002",
            )
        ]
    layer = layers.get(app_settings.CHANNEL_LAYER) or {}
    if not app_settings.REDIS_URL and "channels_redis" in str(layer.get("BACKEND", "")):
        return [
            Warning(
                "The notifications channel layer is shared by several processes but "
                "NOTIFICATIONS_REDIS_URL is empty: NOTIFICATIONS_MAX_STREAMS_PER_USER is "
                "counted in each process, so a user may open that many streams on each.",
                hint="Set NOTIFICATIONS_REDIS_URL to the Redis of the channel layer.",
                id="notifications.W004",
            )
        ]
    return []


def _check_database() -> list[CheckMessage]:
    # Streams find gaps by id, which needs ids to become visible in order: services.notify
    # serialises inserts with an advisory lock on PostgreSQL; SQLite needs IMMEDIATE
    # transactions so that the lock is taken before the first read.
    db = connections.settings["default"] if "default" in connections.settings else {}
    engine = str(db.get("ENGINE", ""))
    if engine.endswith("sqlite3"):
        mode = str(db.get("OPTIONS", {}).get("transaction_mode", "")).upper()
        if mode != "IMMEDIATE":
            return [
                Warning(
                    "notifications.notify() reads then writes in one transaction; with SQLite "
                    "deferred transactions, concurrent senders may fail with 'database is "
                    "locked'.",
                    hint='Set DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE".',
                    id="notifications.W002",
                )
            ]
    elif engine and not engine.endswith(("postgresql", "postgis")):
        return [
            Warning(
                f"notifications is tested on PostgreSQL and SQLite, not {engine}: streams "
                "may miss a notification when two are stored concurrently.",
                id="notifications.W003",
            )
        ]
    return []


@register(deploy=True)
def check_notifications_redis(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``check --deploy``: the Redis of the stream cap answers."""
    if kit_checks.setting_value_errors(app_settings, "notifications.E003"):
        return []
    url = app_settings.REDIS_URL
    problem = kit_checks.redis_problem(url) if url else None
    if problem is None:
        return []
    return [
        Error(
            f"The Redis of NOTIFICATIONS_REDIS_URL ({url}) does not answer: {problem}.",
            hint="Start Redis, or fix the URL.",
            id="notifications.E004",
        )
    ]
