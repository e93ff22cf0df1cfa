"""The small things a newcomer hit (issue 12): the assistant account gets no notifications,
demo replies quote only the question, stored demo replies keep their mark, the demo command
says how to log in every run, the runner's "ready" line."""

from __future__ import annotations

from datetime import UTC, datetime
from io import StringIO
from types import SimpleNamespace

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from chat import protocol
from chat.assistant.replies import DEMO_STREAM_ID_PREFIX, assistant_user
from chat.llm.demo import DEMO_REPLY, asked, demo_reply
from chat.models import Room
from notifications import notify
from notifications.models import Notification
from realtime_kit.server import ready_line
from tests.servers import DaphneServer

LIMITS = protocol.Limits(max_text_length=20, max_frame_bytes=256, max_frames_per_message=3)


def test_demo_reply_quotes_the_question_not_the_room_prompt_format() -> None:
    reply = demo_reply([{"role": "user", "content": "alice: @assistant what is   up?"}])
    assert "“what is up?”" in reply
    assert "alice:" not in reply and "@assistant" not in reply


def test_demo_reply_keeps_a_panel_question_as_it_is() -> None:
    # Only the room's "name: @assistant" framing goes; a colon in a question stays.
    assert asked("note: is this kept?") == "note: is this kept?"
    assert asked("@Assistant, hello") == "hello"
    assert "“nothing”" in demo_reply([{"role": "user", "content": "bob: @assistant"}])


def test_demo_reply_tells_the_truth_about_reloading() -> None:
    # The private panel starts over on reload (its page says so); a room keeps the reply.
    assert "reload the page and see it continue" not in DEMO_REPLY
    assert "panel keeps nothing, so a reload there starts over" in DEMO_REPLY


@pytest.mark.django_db
def test_the_assistant_account_is_inactive_and_never_notified() -> None:
    bot = assistant_user()
    assert not bot.is_active and not bot.has_usable_password()
    User.objects.create_user("alice", password="pw-alice-1")
    # Notified directly (bypassing chat's own exclusion) or in a broadcast to everyone: nothing.
    assert notify(bot, "hi") == 0
    assert notify(User.objects.all(), "Maintenance tonight") == 1
    assert list(Notification.objects.values_list("recipient__username", flat=True)) == ["alice"]


@pytest.mark.django_db
def test_an_active_assistant_of_an_older_version_is_deactivated() -> None:
    User.objects.create(username="assistant", is_active=True)
    assert not assistant_user().is_active
    assert not User.objects.get(username="assistant").is_active


def test_people_cannot_send_the_assistants_client_ids() -> None:
    (result,) = protocol.parse_client_text(
        '{"type":"message","text":"hi","client_id":"asst-demo-1"}', LIMITS
    )
    assert isinstance(result, protocol.FrameError) and result.code == protocol.BAD_FRAME


def test_a_stored_demo_reply_is_marked_demo() -> None:
    created = datetime(2026, 1, 2, tzinfo=UTC)
    user = SimpleNamespace(pk=9, get_username=lambda: "assistant")

    def frame(client_id: str) -> dict[str, object]:
        message = SimpleNamespace(id=1, seq=2, text="t", client_id=client_id, created_at=created)
        return protocol.message_frame(message, "lobby", user)

    assert frame(DEMO_STREAM_ID_PREFIX + "abc")["demo"] is True
    assert "demo" not in frame("asst-abc")
    assert "demo" not in frame("")


@pytest.mark.django_db
def test_chat_demo_says_how_to_log_in_on_every_run() -> None:
    Room.objects.all().delete()
    for _ in range(2):
        out = StringIO()
        call_command("chat_demo", stdout=out)
        assert "Demo login: alice / demo-pass-123" in out.getvalue()
        assert "createsuperuser" in out.getvalue()
    user = User.objects.get(username="bob")
    user.set_password("changed-pw-1")
    user.save()
    out = StringIO()
    call_command("chat_demo", stdout=out)
    assert "Demo login: alice / demo-pass-123" in out.getvalue()
    assert "demo-pass-123" not in out.getvalue().split("bob", 1)[1].split("\n", 1)[0]
    assert "changepassword bob" in out.getvalue()


def test_ready_line() -> None:
    address = SimpleNamespace(host="127.0.0.1", port=8000)
    assert ready_line(address) == "serving http://127.0.0.1:8000/ (Ctrl-C to stop)"
    assert (
        ready_line(SimpleNamespace(host="::1", port=9))
        == "serving http://[::1]:9/ (Ctrl-C to stop)"
    )


@pytest.mark.e2e
@pytest.mark.daphne_only  # our runner prints it; uvicorn has its own startup line
def test_the_runner_says_ready_once_it_listens(daphne: DaphneServer) -> None:
    # The fixture returns once /healthz answers: the port listens, and the line is there.
    assert f"ready: serving http://127.0.0.1:{daphne.port}/" in daphne.log_tail()
