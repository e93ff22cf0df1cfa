"""In-process tests of history paging: query parameters (pure) and pages (one database)."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User

from chat import protocol
from chat.api import MAX_SEQ, BadParameter
from chat.models import Message, Room
from chat.paging import PageParams, history_page, parse_page_params


def parse(**query: str) -> PageParams:
    return parse_page_params(query, default_limit=50, max_limit=100)


def test_defaults() -> None:
    assert parse() == PageParams(before=None, limit=50)


def test_values_are_read() -> None:
    assert parse(before="17", limit="5") == PageParams(before=17, limit=5)
    assert parse(before="1", limit="1") == PageParams(before=1, limit=1)
    assert parse(before=str(MAX_SEQ)) == PageParams(before=MAX_SEQ, limit=50)


def test_limit_is_cut_to_the_maximum() -> None:
    assert parse(limit="100").limit == 100
    assert parse(limit="101").limit == 100
    assert parse(limit="5000000").limit == 100


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": "abc"},
        {"limit": ""},
        {"limit": "1.5"},
        {"limit": " 5"},
        {"limit": "+5"},
        {"limit": "5_0"},
        {"limit": "\u0665"},  # ARABIC-INDIC DIGIT FIVE: int() would accept it
        {"before": "0"},
        {"before": "-3"},
        {"before": ""},
        {"before": "x"},
        {"before": "1e3"},
        {"before": str(MAX_SEQ + 1)},
        {"before": "9" * 40},
    ],
)
def test_bad_values_are_refused(query: dict[str, str]) -> None:
    with pytest.raises(BadParameter) as info:
        parse(**query)
    assert next(iter(query)) in str(info.value)


@pytest.fixture
def room_with(db: None) -> tuple[Room, User]:
    user = User.objects.create_user(username="alice", password="x")
    room = Room.objects.create(slug="lobby", title="Lobby")
    Message.objects.create(room=Room.objects.create(slug="other", title="O"), seq=1, user=user)
    return room, user


def fill(room: Room, user: User, seqs: range | list[int]) -> None:
    Message.objects.bulk_create(Message(room=room, seq=s, user=user, text=f"m{s}") for s in seqs)


def page_seqs(page: dict[str, Any]) -> list[int]:
    return [m["seq"] for m in page["messages"]]


def test_latest_page_oldest_first(room_with: tuple[Room, User]) -> None:
    room, user = room_with
    fill(room, user, range(1, 11))
    page = history_page(room, PageParams(before=None, limit=4))
    assert page_seqs(page) == [7, 8, 9, 10]
    assert page["has_more"] is True
    assert page["next_before"] == 7


def test_walking_back_reaches_the_first_message(room_with: tuple[Room, User]) -> None:
    room, user = room_with
    fill(room, user, range(1, 11))
    seen: list[list[int]] = []
    before: int | None = None
    while True:
        page = history_page(room, PageParams(before=before, limit=4))
        seen.append(page_seqs(page))
        if not page["has_more"]:
            assert page["next_before"] is None
            break
        before = page["next_before"]
    assert seen == [[7, 8, 9, 10], [3, 4, 5, 6], [1, 2]]


def test_exact_boundary_has_no_more(room_with: tuple[Room, User]) -> None:
    room, user = room_with
    fill(room, user, range(1, 9))
    page = history_page(room, PageParams(before=5, limit=4))
    assert page_seqs(page) == [1, 2, 3, 4]
    assert page["has_more"] is False
    assert page["next_before"] is None


def test_gaps_left_by_deletes_do_not_end_paging_early(room_with: tuple[Room, User]) -> None:
    room, user = room_with
    fill(room, user, [1, 2, 9, 10])
    page = history_page(room, PageParams(before=9, limit=1))
    assert page_seqs(page) == [2]
    assert page["has_more"] is True


def test_empty_pages(room_with: tuple[Room, User]) -> None:
    room, user = room_with
    assert history_page(room, PageParams(before=None, limit=5)) == {
        "messages": [],
        "has_more": False,
        "next_before": None,
    }
    fill(room, user, range(1, 4))
    page = history_page(room, PageParams(before=1, limit=5))
    assert (page_seqs(page), page["has_more"], page["next_before"]) == ([], False, None)


def test_messages_are_message_frames(room_with: tuple[Room, User]) -> None:
    room, user = room_with
    fill(room, user, range(1, 3))
    page = history_page(room, PageParams(before=None, limit=5))
    expected = [
        protocol.message_frame(m, "lobby", m.user)
        for m in Message.objects.filter(room=room).select_related("user").order_by("seq")
    ]
    assert page["messages"] == expected


def test_system_checks_cover_the_paging_and_export_settings() -> None:
    from django.test import override_settings

    from chat.checks import check_chat_settings

    with override_settings(CHAT_EXPORT_PAGE_SIZE=0, CHAT_HISTORY_PAGE_MAX=-1):
        messages = [m.msg for m in check_chat_settings() if m.id == "chat.E001"]
    assert any("CHAT_EXPORT_PAGE_SIZE" in m for m in messages)
    assert any("CHAT_HISTORY_PAGE_MAX" in m for m in messages)
    with override_settings(CHAT_HISTORY_PAGE_SIZE=500):
        assert "chat.W301" in [m.id for m in check_chat_settings()]
    assert not [m for m in check_chat_settings() if m.id in ("chat.E001", "chat.W301")]
