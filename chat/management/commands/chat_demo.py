"""Create the demo users and the public lobby if they are missing (idempotent)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from chat.assistant import assistant_user
from chat.models import Room

# A public demo credential for local `make run` only, printed on the console by design.
DEFAULT_PASSWORD = "demo-pass-123"  # noqa: S105


class Command(BaseCommand):
    help = "Create demo users (alice, bob, assistant) and the public room 'lobby' if absent."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--password", default=DEFAULT_PASSWORD)

    def handle(self, *args: Any, **options: Any) -> None:
        password: str = options["password"]
        User = get_user_model()
        created_users = []
        for username in ["alice", "bob"]:
            if not User.objects.filter(username=username).exists():
                User.objects.create_user(username=username, password=password)
                created_users.append(username)
        # Room replies are stored as this user (no usable password: nobody logs in as it).
        assistant_user()
        _, room_created = Room.objects.get_or_create(
            slug="lobby", defaults={"title": "Lobby", "is_private": False}
        )
        if created_users:
            self.stdout.write(f"Created demo users {', '.join(created_users)}.")
        if room_created:
            self.stdout.write("Created the public room 'lobby'.")
        self.stdout.write(
            self.style.SUCCESS(
                f"Demo login: alice / {password}  or  bob / {password}"
                if created_users
                else "Demo users alice and bob exist (their password is unchanged)."
            )
        )
