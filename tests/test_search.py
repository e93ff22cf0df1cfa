"""Search on SQLite (the substring fallback): members only, keyset pages, bounded input, the
HTML page. tests/test_e2e_search_postgres.py runs the full-text path."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth.models import User
from django.test import Client, override_settings

from chat import search
from chat.api import BadParameter
from chat.models import Membership, Message, Room

pytestmark = [pytest.mark.django_db]


def login(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def store(room: Room, user: User, *texts: str) -> None:
    for text in texts:
        Room.objects.filter(pk=room.pk).update(last_seq=room.last_seq + 1)
        room.refresh_from_db()
        Message.objects.create(room=room, seq=room.last_seq, user=user, text=text)


@pytest.fixture
def alice() -> User:
    return User.objects.create_user("alice", password="x")


@pytest.fixture
def bob() -> User:
    return User.objects.create_user("bob", password="x")


@pytest.fixture
def rooms(alice: User, bob: User) -> tuple[Room, Room]:
    """A public lobby and a private room of alice only, each with matching messages."""
    lobby = Room.objects.create(slug="lobby", title="Lobby")
    secret = Room.objects.create(slug="secret", title="Secret", is_private=True)
    Membership.objects.create(room=secret, user=alice)
    store(lobby, bob, "hello deploy", "unrelated", "Deploy tonight")
    store(secret, alice, "secret deploy plan")
    return lobby, secret


def test_room_search_finds_substrings_case_insensitively(alice: User, rooms: object) -> None:
    body = login(alice).get("/chat/lobby/search/", {"q": "DEPLOY"}).json()
    assert [(r["seq"], r["text"]) for r in body["results"]] == [
        (3, "Deploy tonight"),
        (1, "hello deploy"),
    ]
    first = body["results"][0]
    assert first["url"] == "/chat/lobby/#seq-3"
    assert (first["room"], first["room_title"], first["user"]) == ("lobby", "Lobby", "bob")
    assert body["has_more"] is False and body["next_before"] is None


def test_global_search_covers_only_readable_rooms(alice: User, bob: User, rooms: object) -> None:
    mine = login(alice).get("/chat/search/", {"q": "deploy"}).json()["results"]
    assert sorted(r["room"] for r in mine) == ["lobby", "lobby", "secret"]
    theirs = login(bob).get("/chat/search/", {"q": "deploy"}).json()["results"]
    assert sorted(r["room"] for r in theirs) == ["lobby", "lobby"]


def test_private_room_search_is_for_members_only(bob: User, rooms: object) -> None:
    response = login(bob).get("/chat/secret/search/", {"q": "deploy"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert login(bob).get("/chat/nope/search/", {"q": "x"}).status_code == 404
    page = login(bob).get("/chat/secret/search/", {"q": "deploy", "format": "html"})
    assert page.status_code == 403 and "Secret is a private room" in page.content.decode()
    assert "secret deploy plan" not in page.content.decode()


def test_anonymous_gets_401_json_and_a_login_redirect_for_the_page(rooms: object) -> None:
    response = Client().get("/chat/search/", {"q": "deploy"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    page = Client().get("/chat/search/", {"q": "deploy", "format": "html"})
    assert page.status_code == 302 and "/accounts/login/" in page["Location"]
    assert Client().get("/chat/lobby/search/", {"q": "deploy"}).status_code == 401


def test_pages_walk_back_without_repeats(alice: User, rooms: tuple[Room, Room]) -> None:
    lobby, _ = rooms
    store(lobby, alice, *[f"deploy {n}" for n in range(7)])
    client = login(alice)
    seen: list[int] = []
    before: int | None = None
    while True:
        query = {"q": "deploy", "limit": "3", **({"before": str(before)} if before else {})}
        body = client.get("/chat/lobby/search/", query).json()
        assert len(body["results"]) <= 3
        seen.extend(r["seq"] for r in body["results"])
        if not body["has_more"]:
            break
        before = body["next_before"]
    assert seen == [10, 9, 8, 7, 6, 5, 4, 3, 1]


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"q": ""},
        {"q": "   "},
        {"q": "x" * 401},
        {"q": "é" * 201},  # 201 characters, 402 bytes
        {"q": "a", "limit": "0"},
        {"q": "a", "before": "-1"},
    ],
)
def test_bad_queries_are_400(alice: User, rooms: object, query: dict[str, str]) -> None:
    response = login(alice).get("/chat/search/", query)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_page_size_is_capped(alice: User, rooms: tuple[Room, Room]) -> None:
    lobby, _ = rooms
    store(lobby, alice, *["deploy"] * 5)
    with override_settings(CHAT_SEARCH_PAGE_MAX=2):
        body = login(alice).get("/chat/lobby/search/", {"q": "deploy", "limit": "100"}).json()
    assert len(body["results"]) == 2 and body["has_more"] is True


def test_params_are_parsed_and_bounded() -> None:
    params = search.parse_search_params(
        {"q": "  hi  ", "before": "9", "limit": "500"}, max_bytes=5, default_limit=2, max_limit=50
    )
    assert params == search.SearchParams(q="hi", before=9, limit=50)
    with pytest.raises(BadParameter):
        search.parse_search_params({"q": "a\x00"}, max_bytes=5, default_limit=2, max_limit=5)
    # The bound counts UTF-8 bytes: five ASCII letters fit in 5, three é (6 bytes) do not.
    assert search.parse_search_params({"q": "abcde"}, max_bytes=5, default_limit=2, max_limit=5)
    with pytest.raises(BadParameter, match="longer than 5 bytes"):
        search.parse_search_params({"q": "ééé"}, max_bytes=5, default_limit=2, max_limit=5)


def test_the_old_query_length_setting_is_reported() -> None:
    from chat.checks import check_chat_settings

    assert "chat.W005" not in [m.id for m in check_chat_settings()]
    with override_settings(CHAT_SEARCH_MAX_QUERY_CHARS=100):
        assert "chat.W005" in [m.id for m in check_chat_settings()]


def test_html_page_escapes_and_links(alice: User, rooms: tuple[Room, Room]) -> None:
    lobby, _ = rooms
    store(lobby, alice, "deploy <script>alert(1)</script>")
    response = login(alice).get("/chat/lobby/search/", {"q": "deploy", "format": "html"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;" in page
    assert 'href="/chat/lobby/#seq-4"' in page
    bad = login(alice).get("/chat/search/", {"q": "", "format": "html"})
    assert bad.status_code == 400 and "q must not be empty" in bad.content.decode()


def test_sqlite_uses_the_substring_fallback() -> None:
    assert search.uses_full_text() is False


def test_searches_are_rate_limited_per_user_across_rooms(
    alice: User, bob: User, rooms: tuple[Room, Room]
) -> None:
    # An attacker loops on the costliest read there is; each user has a budget of their own.
    client = login(alice)
    with override_settings(CHAT_SEARCH_RATE_LIMIT=3, CHAT_SEARCH_RATE_LIMIT_WINDOW_SECONDS=120):
        assert client.get("/chat/search/", {"q": "deploy"}).status_code == 200
        assert client.get("/chat/lobby/search/", {"q": "deploy"}).status_code == 200
        assert client.get("/chat/secret/search/", {"q": "plan"}).status_code == 200
        refused = client.get("/chat/lobby/search/", {"q": "deploy"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert "3 searches per 120 s" in refused.json()["error"]["message"]
        assert 1 <= int(refused["Retry-After"]) <= 120
        page = client.get("/chat/search/", {"q": "deploy", "format": "html"})
        assert page.status_code == 429 and "3 searches per 120 s" in page.content.decode()
        assert int(page["Retry-After"]) >= 1
        # Invalid requests cost nothing and are still told what is wrong.
        assert client.get("/chat/search/", {"q": ""}).status_code == 400
        # Another user is not affected.
        assert login(bob).get("/chat/search/", {"q": "deploy"}).status_code == 200


def test_refused_searches_do_not_extend_the_wait(alice: User, rooms: object) -> None:
    # A client hammering at the limit is let in again once its last allowed search leaves
    # the window: refusals are not counted (else it would lock itself out for as long as
    # it keeps trying).
    client = login(alice)
    with override_settings(CHAT_SEARCH_RATE_LIMIT=1, CHAT_SEARCH_RATE_LIMIT_WINDOW_SECONDS=2):
        assert client.get("/chat/search/", {"q": "deploy"}).status_code == 200
        time.sleep(1.0)
        for _ in range(20):
            assert client.get("/chat/search/", {"q": "deploy"}).status_code == 429
        time.sleep(1.1)  # the allowed search is out of the window; the refusals would not be
        assert client.get("/chat/search/", {"q": "deploy"}).status_code == 200


@override_settings(CHAT_SEARCH_RATE_LIMIT=0, CHAT_EDIT_RATE_LIMIT_WINDOW_SECONDS=-1)
def test_rate_limits_must_be_positive() -> None:
    from chat.checks import check_chat_settings

    messages = {m.msg for m in check_chat_settings() if m.id == "chat.E001"}
    assert messages == {
        "CHAT_SEARCH_RATE_LIMIT must be positive, got 0.",
        "CHAT_EDIT_RATE_LIMIT_WINDOW_SECONDS must be positive, got -1.0.",
    }
