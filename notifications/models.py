"""Notifications: one row per recipient. The database is the source of truth for every event."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class Level(models.TextChoices):
    INFO = "info", "Info"
    SUCCESS = "success", "Success"
    WARNING = "warning", "Warning"
    ERROR = "error", "Error"


class Notification(models.Model):
    # Covered by the (recipient, id) index below, so no index of its own.
    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="notifications",
        db_index=False,
    )
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True, default="")
    # A path on this site ("/chat/lobby/#seq-4") or an http(s) URL; checked by services.notify.
    url = models.CharField(max_length=500, blank=True, default="")
    level = models.CharField(max_length=16, choices=Level.choices, default=Level.INFO)
    created_at = models.DateTimeField(default=timezone.now)
    read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # Replay, polls and the list: WHERE recipient = ? AND id > ? ORDER BY id.
            models.Index(fields=["recipient", "id"], name="notif_recipient_id"),
            # The unread count: WHERE recipient = ? AND read_at IS NULL.
            models.Index(fields=["recipient", "read_at"], name="notif_recipient_read"),
        ]

    def __str__(self) -> str:
        return f"{self.title} → {self.recipient_id}"

    @property
    def is_read(self) -> bool:
        return self.read_at is not None
