"""Send a notification from the command line: ``manage.py notify --user alice --title Hi``."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError, CommandParser

from notifications import services
from notifications.models import Level


class Command(BaseCommand):
    help = "Send a notification to users, a group or everyone; open streams get it live."

    def add_arguments(self, parser: CommandParser) -> None:
        who = parser.add_mutually_exclusive_group(required=True)
        who.add_argument(
            "--user",
            action="append",
            dest="users",
            metavar="USERNAME",
            help="A recipient's username (repeat for several).",
        )
        who.add_argument("--group", help="Every member of this group.")
        who.add_argument("--all", action="store_true", help="Every active user.")
        parser.add_argument("--title", required=True)
        parser.add_argument("--body", default="")
        parser.add_argument("--url", default="")
        parser.add_argument("--level", default=Level.INFO, choices=Level.values)

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        if options["users"]:
            names: list[str] = options["users"]
            recipients = User.objects.filter(**{f"{User.USERNAME_FIELD}__in": names})
            found = set(recipients.values_list(User.USERNAME_FIELD, flat=True))
            missing = [n for n in names if n not in found]
            if missing:
                raise CommandError(f"No such users: {', '.join(missing)}.")
        elif options["group"]:
            try:
                group = Group.objects.get(name=options["group"])
            except Group.DoesNotExist:
                raise CommandError(f"No such group: {options['group']}.") from None
            recipients = User.objects.filter(groups=group)
        else:
            recipients = User.objects.filter(is_active=True)
        try:
            count = services.notify(
                recipients,
                title=options["title"],
                body=options["body"],
                url=options["url"],
                level=options["level"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(self.style.SUCCESS(f"Sent {count} notification(s)."))
