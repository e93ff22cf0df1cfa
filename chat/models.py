"""Rooms, memberships and messages. The database is the source of truth for every frame."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class Room(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    title = models.CharField(max_length=200)
    is_private = models.BooleanField(
        default=False, help_text="Private rooms admit only users with a membership."
    )
    # Highest seq handed out in this room. Incremented under the room's row lock in the
    # same transaction as the insert, so a rolled-back send never leaves a gap.
    last_seq = models.PositiveBigIntegerField(default=0, editable=False)
    # Highest update_seq handed out in this room: every edit or delete of one of its messages
    # takes the next one, under the same row lock, so changes are ordered like messages.
    last_update_seq = models.PositiveBigIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    # Who created the room in the app (chat/rooms.py): they rename it, make it private and
    # manage its members. Null for rooms made in the admin or a shell, and when the owner
    # account is deleted (the room stays; staff manage it).
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="owned_chat_rooms",
    )

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_memberships"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["room", "user"], name="chat_membership_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.room}"


class Message(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    seq = models.PositiveBigIntegerField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="chat_messages"
    )
    text = models.TextField()
    # Chosen by the client so a resend after a reconnect is recognised (idempotent send).
    client_id = models.CharField(max_length=64, blank=True, default="")

    class Status(models.TextChoices):
        COMPLETE = "", "complete"
        STOPPED = "stopped", "stopped"
        ERROR = "error", "error"
        INTERRUPTED = "interrupted", "interrupted"

    # How an assistant reply ended: "" (complete, and every member's message), or its partial
    # text stopped by a member, cut by an upstream failure or interrupted by a server restart.
    status = models.CharField(max_length=16, choices=Status, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # When the text last changed (an edit or the delete); None for a message never changed.
    edited_at = models.DateTimeField(null=True, blank=True)
    # A deleted message keeps its row and seq (seq stays gap-free); its text is emptied.
    deleted = models.BooleanField(default=False)
    # The room's update_seq of the latest change (0: never changed). Resumes replay the
    # messages whose update_seq is above what the client has seen.
    update_seq = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="chat_message_room_seq"),
            models.UniqueConstraint(
                fields=["room", "user", "client_id"],
                condition=~Q(client_id=""),
                name="chat_message_client_id",
            ),
        ]
        indexes = [
            models.Index(fields=["user", "created_at"], name="chat_msg_user_created"),
            models.Index(fields=["room", "update_seq"], name="chat_msg_room_update"),
        ]

    def __str__(self) -> str:
        return f"{self.room}#{self.seq}"


class ReadMarker(models.Model):
    """The highest seq a user has read in a room. Only ever moves forward."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="read_markers")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_read_markers"
    )
    last_read_seq = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["room", "user"], name="chat_readmarker_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.user} read {self.room} to #{self.last_read_seq}"


class AssistantRun(models.Model):
    """A room reply of the assistant while it streams, recorded so that it survives the death
    of the process streaming it: that process refreshes ``heartbeat_at`` and ``text`` every
    ``CHAT_ASSISTANT_HEARTBEAT_SECONDS``; once the heartbeat is ``CHAT_ASSISTANT_TAKEOVER_SECONDS``
    old another process stores ``text`` as an interrupted reply and ends the stream
    (chat/assistant_runs.py). The row is deleted when the reply ends."""

    stream_id = models.CharField(max_length=64, unique=True)
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="+")
    request_seq = models.PositiveBigIntegerField()
    # Which process streams it (a random token per process), so that a process whose run was
    # taken over while it was only slow notices on its next heartbeat and stops.
    owner = models.CharField(max_length=32)
    text = models.TextField(blank=True, default="")
    heartbeat_at = models.DateTimeField(db_index=True)
    started_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.stream_id
