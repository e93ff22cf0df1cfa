"""The takeover rules of chat/assistant/runs.py, against the database: one sweeper wins a stale
run, a live heartbeat keeps it, the owner notices a takeover, a store happens once."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from django.utils import timezone

from chat.assistant import runs as assistant_runs
from chat.models import AssistantRun, Message, Room

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def room() -> Room:
    return Room.objects.create(slug="lobby", title="Lobby")


def make_run(room: Room, stream_id: str, age_seconds: float, text: str = "partial") -> None:
    assistant_runs.open_run(stream_id, room.pk, request_seq=1)
    AssistantRun.objects.filter(stream_id=stream_id).update(
        text=text, heartbeat_at=timezone.now() - timedelta(seconds=age_seconds)
    )


@override_settings(CHAT_ASSISTANT_TAKEOVER_SECONDS=5.0)
def test_only_stale_runs_are_claimed_and_only_once(room: Room) -> None:
    make_run(room, "asst-fresh", age_seconds=1)
    make_run(room, "asst-stale", age_seconds=6)
    (orphan,) = assistant_runs.claim_stale()
    assert orphan.stream_id == "asst-stale" and orphan.text == "partial"
    # The claim refreshed its heartbeat: a second sweeper (another process) finds nothing.
    assert assistant_runs.claim_stale() == []
    # The dead owner's late heartbeat no longer matches: the run is not its own any more.
    assert not assistant_runs.checkpoint("asst-stale", "more text")
    assert assistant_runs.checkpoint("asst-fresh", "more text")


@override_settings(CHAT_ASSISTANT_TAKEOVER_SECONDS=5.0)
def test_an_orphan_is_stored_once_as_interrupted_and_forgotten(room: Room) -> None:
    User.objects.create_user("assistant")
    make_run(room, "asst-x", age_seconds=10, text="half a reply")
    (orphan,) = assistant_runs.claim_stale()
    seq = assistant_runs.store_orphan(orphan)
    assert seq is not None
    message = Message.objects.get(room=room, seq=seq)
    assert (message.text, message.status, message.client_id) == (
        "half a reply",
        "interrupted",
        "asst-x",
    )
    assert message.user.username == "assistant"
    assert not AssistantRun.objects.exists()
    # Storing the same claim again (a retried sweep) stores nothing more.
    assert assistant_runs.store_orphan(orphan) is None
    assert Message.objects.filter(room=room).count() == 1


@override_settings(CHAT_ASSISTANT_TAKEOVER_SECONDS=5.0)
def test_a_run_claimed_twice_is_stored_by_the_last_claimer_only(room: Room) -> None:
    make_run(room, "asst-y", age_seconds=10)
    (first,) = assistant_runs.claim_stale()
    # The first claimer stalled past the takeover bound itself: a second one claims it.
    AssistantRun.objects.filter(pk=first.pk).update(
        heartbeat_at=timezone.now() - timedelta(seconds=10)
    )
    (second,) = assistant_runs.claim_stale()
    assert assistant_runs.store_orphan(first) is None
    assert Message.objects.count() == 0
    assert assistant_runs.store_orphan(second) is not None
    assert Message.objects.filter(client_id="asst-y").count() == 1


def test_an_empty_orphan_is_forgotten_without_a_message(room: Room) -> None:
    make_run(room, "asst-z", age_seconds=60, text="")
    (orphan,) = assistant_runs.claim_stale()
    assert assistant_runs.store_orphan(orphan) is None
    assert not AssistantRun.objects.exists() and not Message.objects.exists()


def test_the_owner_forgets_its_run(room: Room) -> None:
    make_run(room, "asst-w", age_seconds=0)
    assistant_runs.close_run("asst-w")
    assert not AssistantRun.objects.exists()


def test_a_takeover_bound_too_close_to_the_heartbeat_is_a_check_error() -> None:
    from chat.checks import check_chat_settings

    def ids() -> list[str]:
        return [m.id for m in check_chat_settings() if m.id == "chat.E020"]

    with override_settings(CHAT_ASSISTANT_HEARTBEAT_SECONDS=1, CHAT_ASSISTANT_TAKEOVER_SECONDS=2):
        assert ids() == ["chat.E020"]
    with override_settings(CHAT_ASSISTANT_HEARTBEAT_SECONDS=1, CHAT_ASSISTANT_TAKEOVER_SECONDS=3):
        assert ids() == []
