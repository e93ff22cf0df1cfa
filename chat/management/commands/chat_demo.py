"""Create the demo users and the public lobby if they are missing (idempotent)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import models

from chat.assistant.replies import assistant_user
from chat.models import Room

# A public demo credential for local `make run` only, printed on the console by design.
DEFAULT_PASSWORD = "demo-pass-123"  # noqa: S105
# Demo logins where the user model logs in with an e-mail (USERNAME_FIELD an EmailField).
DEMO_EMAIL_DOMAIN = "example.com"


def demo_login(user_model: Any, name: str) -> str:
    """The value of the user model's USERNAME_FIELD for the demo user ``name``."""
    field = user_model._meta.get_field(user_model.USERNAME_FIELD)
    return f"{name}@{DEMO_EMAIL_DOMAIN}" if isinstance(field, models.EmailField) else name


class Command(BaseCommand):
    help = "Create demo users (alice, bob, assistant) and the public room 'lobby' if absent."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--password", default=DEFAULT_PASSWORD)

    def handle(self, *args: Any, **options: Any) -> None:
        password: str = options["password"]
        User = get_user_model()
        logins = [demo_login(User, name) for name in ("alice", "bob")]
        created_users = []
        for login in logins:
            if not User.objects.filter(**{User.USERNAME_FIELD: login}).exists():
                User.objects.create_user(**{User.USERNAME_FIELD: login}, password=password)
                created_users.append(login)
        # Room replies are stored as this user (no usable password: nobody logs in as it).
        assistant_user()
        _, room_created = Room.objects.get_or_create(
            slug="lobby", defaults={"title": "Lobby", "is_private": False}
        )
        if created_users:
            self.stdout.write(f"Created demo users {', '.join(created_users)}.")
        if room_created:
            self.stdout.write("Created the public room 'lobby'.")
        # Every run says how to log in: `make run` runs this each time, and a newcomer who
        # missed the first run's output must not have to guess the password.
        for line in login_lines(User, logins, password):
            self.stdout.write(self.style.SUCCESS(line))
        self.stdout.write(
            "Admin (/admin/): create a staff account with "
            "`.venv/bin/python manage.py createsuperuser`."
        )


def login_lines(user_model: Any, logins: list[str], password: str) -> list[str]:
    """How to log in as each demo user: the password, or how to set one if it was changed."""
    lines = []
    for login in logins:
        user = user_model.objects.get(**{user_model.USERNAME_FIELD: login})
        if user.check_password(password):
            lines.append(f"Demo login: {login} / {password}")
        else:
            lines.append(
                f"Demo login: {login} (password changed; reset it with "
                f"`.venv/bin/python manage.py changepassword {login}`)"
            )
    return lines
