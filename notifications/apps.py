from __future__ import annotations

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from realtime_kit import drain

        from . import checks, hub  # noqa: F401  (checks registers system checks)

        # On a restart, open streams end cleanly; clients resume with Last-Event-ID.
        drain.on_drain(hub.end_streams)
