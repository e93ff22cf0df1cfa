"""Forms staff use to send notifications (admin views and the user admin action)."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from . import services
from .models import Level

AUDIENCE_USERS = "users"
AUDIENCE_GROUP = "group"
AUDIENCE_ALL = "all"


def _validate_url(value: str) -> None:
    try:
        services.validate_url(value)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


class NotificationContentForm(forms.Form):
    title = forms.CharField(max_length=services.TITLE_MAX_LENGTH)
    body = forms.CharField(widget=forms.Textarea(attrs={"rows": 4}), required=False)
    url = forms.CharField(
        max_length=services.URL_MAX_LENGTH,
        required=False,
        validators=[_validate_url],
        help_text="A path on this site (/chat/lobby/) or an http(s) URL; optional.",
    )
    level = forms.ChoiceField(choices=Level.choices, initial=Level.INFO)

    def content(self) -> dict[str, str]:
        data = self.cleaned_data
        return {
            "title": data["title"],
            "body": data["body"],
            "url": data["url"],
            "level": data["level"],
        }


class SendNotificationForm(NotificationContentForm):
    audience = forms.ChoiceField(
        choices=[
            (AUDIENCE_USERS, "These users"),
            (AUDIENCE_GROUP, "A group"),
            (AUDIENCE_ALL, "Everyone (all active users)"),
        ],
        initial=AUDIENCE_USERS,
        widget=forms.RadioSelect,
    )
    usernames = forms.CharField(
        required=False, help_text="Usernames separated by commas or spaces."
    )
    group = forms.ModelChoiceField(queryset=Group.objects.all(), required=False)

    field_order = ["audience", "usernames", "group", "title", "body", "url", "level"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        audience = data.get("audience")
        if audience == AUDIENCE_USERS:
            names = [n for n in re.split(r"[\s,]+", data.get("usernames", "")) if n]
            if not names:
                self.add_error("usernames", "Name at least one user.")
                return data
            User = get_user_model()
            found = set(
                User.objects.filter(**{f"{User.USERNAME_FIELD}__in": names}).values_list(
                    User.USERNAME_FIELD, flat=True
                )
            )
            missing = [n for n in names if n not in found]
            if missing:
                self.add_error("usernames", f"No such users: {', '.join(missing)}.")
            data["usernames"] = names
        elif audience == AUDIENCE_GROUP and data.get("group") is None:
            self.add_error("group", "Choose a group.")
        return data

    def recipients(self) -> QuerySet[Any]:
        User = get_user_model()
        data = self.cleaned_data
        audience = data["audience"]
        if audience == AUDIENCE_USERS:
            return User.objects.filter(**{f"{User.USERNAME_FIELD}__in": data["usernames"]})
        if audience == AUDIENCE_GROUP:
            return User.objects.filter(groups=data["group"])
        return User.objects.filter(is_active=True)
