"""Rooms in the app: the JSON endpoints (access control, CSRF, bad input), the pages, the admin
and the removal of a member closing their open socket (in-process)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.core.checks import run_checks
from django.template.loader import render_to_string
from django.test import AsyncClient, Client, override_settings

from chat import protocol, rooms_protocol
from chat.models import Membership, Room
from tests.test_consumer import TIMEOUT, connected

API = "/chat/api/rooms/"

pytestmark = [pytest.mark.django_db]


def csrf_client(user: User | None = None) -> Client:
    """A client that enforces CSRF like a browser, with a token cookie (and a login)."""
    client = Client(enforce_csrf_checks=True)
    if user is not None:
        client.force_login(user)
    client.get("/accounts/login/")  # sets the csrftoken cookie
    return client


def call(
    client: Client, method: str, path: str, body: Any = None, *, token: bool = True
) -> tuple[int, Any]:
    """(status, decoded JSON or None) of a request with the CSRF header unless told not to."""
    headers = {"X-CSRFToken": client.cookies["csrftoken"].value} if token else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    kwargs: dict[str, Any] = {"content_type": "application/json", "headers": headers}
    if body is not None:
        kwargs["data"] = data
    response = getattr(client, method.lower())(path, **kwargs)
    decoded = json.loads(response.content) if response.content else None
    return response.status_code, decoded


def code(result: tuple[int, Any]) -> tuple[int, str]:
    status, body = result
    return status, body["error"]["code"]


@pytest.fixture
def alice() -> User:
    return User.objects.create_user("alice", password="x")


@pytest.fixture
def bob() -> User:
    return User.objects.create_user("bob", password="x")


@pytest.fixture
def carol() -> User:
    return User.objects.create_user("carol", password="x")


@pytest.fixture
def staff() -> User:
    return User.objects.create_user("sam", password="x", is_staff=True)


@pytest.fixture
def secret(alice: User, bob: User) -> Room:
    """Private room owned by alice, bob a member."""
    room = Room.objects.create(slug="secret", title="Secret", is_private=True, owner=alice)
    Membership.objects.create(room=room, user=alice)
    Membership.objects.create(room=room, user=bob)
    return room


# --- create --------------------------------------------------------------------------------


def test_create_room_makes_the_creator_owner_and_member(alice: User) -> None:
    status, body = call(csrf_client(alice), "POST", API, {"slug": "team", "title": "Team"})
    assert status == 201
    assert body["slug"] == "team" and body["owner"] == "alice"
    assert body["is_private"] is False and body["member_count"] == 1
    assert body["url"] == "/chat/team/"
    room = Room.objects.get(slug="team")
    assert room.owner == alice
    assert Membership.objects.filter(room=room, user=alice).exists()


def test_create_refuses_without_csrf_token_as_json(alice: User) -> None:
    result = call(csrf_client(alice), "POST", API, {"slug": "t", "title": "T"}, token=False)
    assert code(result) == (403, rooms_protocol.CSRF_FAILED)
    assert not Room.objects.exists()


def test_anonymous_gets_401_on_every_endpoint(secret: Room) -> None:
    client = csrf_client()
    for method, path, body in [
        ("GET", API, None),
        ("POST", API, {"slug": "t", "title": "T"}),
        ("GET", f"{API}secret/", None),
        ("PATCH", f"{API}secret/", {"title": "x"}),
        ("POST", f"{API}secret/members/", {"username": "carol"}),
        ("DELETE", f"{API}secret/members/bob/", None),
    ]:
        assert code(call(client, method, path, body)) == (401, "unauthenticated"), (method, path)


def test_csrf_is_checked_on_every_unsafe_endpoint(alice: User, secret: Room) -> None:
    client = csrf_client(alice)
    for method, path, body in [
        ("PATCH", f"{API}secret/", {"title": "x"}),
        ("POST", f"{API}secret/members/", {"username": "bob"}),
        ("DELETE", f"{API}secret/members/bob/", None),
    ]:
        result = call(client, method, path, body, token=False)
        assert code(result) == (403, rooms_protocol.CSRF_FAILED), (method, path)
    assert Room.objects.get(slug="secret").title == "Secret"
    assert Membership.objects.filter(room=secret, user__username="bob").exists()


@pytest.mark.parametrize(
    ("body", "expected", "field"),
    [
        (b"{not json", (400, "bad_json"), None),
        (b"[1, 2]", (400, "bad_json"), None),
        ({"title": "T"}, (400, "bad_request"), "slug"),
        ({"slug": "t"}, (400, "bad_request"), "title"),
        ({"slug": "Bad Slug", "title": "T"}, (400, "bad_request"), "slug"),
        ({"slug": "x" * 65, "title": "T"}, (400, "bad_request"), "slug"),
        ({"slug": "search", "title": "T"}, (400, "bad_request"), "slug"),
        ({"slug": "t", "title": "x" * 201}, (400, "bad_request"), "title"),
        ({"slug": "t", "title": "a\nb"}, (400, "bad_request"), "title"),
        ({"slug": "t", "title": "   "}, (400, "bad_request"), "title"),
        ({"slug": "t", "title": "T", "is_private": "yes"}, (400, "bad_request"), "is_private"),
        ({"slug": "t", "title": "T", "owner": "bob"}, (400, "bad_request"), "owner"),
        ({"slug": "t", "title": "x" * 9000}, (413, "too_large"), None),
    ],
)
def test_create_refuses_bad_bodies(
    alice: User, body: Any, expected: tuple[int, str], field: str | None
) -> None:
    status, answer = call(csrf_client(alice), "POST", API, body)
    assert (status, answer["error"]["code"]) == expected
    assert answer["error"].get("field") == field
    assert not Room.objects.exists()


def test_slug_taken(alice: User, bob: User) -> None:
    assert call(csrf_client(alice), "POST", API, {"slug": "t", "title": "A"})[0] == 201
    assert code(call(csrf_client(bob), "POST", API, {"slug": "t", "title": "B"})) == (
        409,
        "slug_taken",
    )
    assert Room.objects.get(slug="t").title == "A"


def test_staff_only_creators(alice: User, staff: User) -> None:
    with override_settings(CHAT_ROOM_CREATORS="staff"):
        refused = call(csrf_client(alice), "POST", API, {"slug": "a", "title": "A"})
        assert code(refused) == (403, "forbidden")
        assert call(csrf_client(staff), "POST", API, {"slug": "s", "title": "S"})[0] == 201
        assert call(csrf_client(alice), "GET", API)[1]["may_create"] is False
    assert list(Room.objects.values_list("slug", flat=True)) == ["s"]


@override_settings(CHAT_MAX_OWNED_ROOMS=2)
def test_owned_rooms_are_bounded_except_for_staff(alice: User, staff: User) -> None:
    owner = csrf_client(alice)
    for slug in ("a1", "a2"):
        assert call(owner, "POST", API, {"slug": slug, "title": slug})[0] == 201
    assert code(call(owner, "POST", API, {"slug": "a3", "title": "A3"})) == (409, "too_many_rooms")
    for slug in ("s1", "s2", "s3"):
        assert call(csrf_client(staff), "POST", API, {"slug": slug, "title": slug})[0] == 201
    assert Room.objects.filter(owner=alice).count() == 2


def test_bad_room_creators_value_is_a_check_error() -> None:
    with override_settings(CHAT_ROOM_CREATORS="everyone"):
        ids = [m.id for m in run_checks()]
    assert "chat.E030" in ids
    assert "chat.E030" not in [m.id for m in run_checks()]


# --- rename / privacy ----------------------------------------------------------------------


def test_patch_access(alice: User, bob: User, carol: User, staff: User, secret: Room) -> None:
    path = f"{API}secret/"
    assert code(call(csrf_client(bob), "PATCH", path, {"title": "B"})) == (403, "forbidden")
    assert code(call(csrf_client(carol), "PATCH", path, {"title": "C"})) == (403, "forbidden")
    assert Room.objects.get(pk=secret.pk).title == "Secret"
    status, body = call(csrf_client(alice), "PATCH", path, {"title": "Owned"})
    assert (status, body["title"], body["may_manage"]) == (200, "Owned", True)
    # Staff manage a private room they are not a member of.
    status, body = call(csrf_client(staff), "PATCH", path, {"is_private": False})
    assert (status, body["is_private"]) == (200, False)
    assert code(call(csrf_client(alice), "PATCH", f"{API}nope/", {"title": "x"})) == (
        404,
        "not_found",
    )
    assert code(call(csrf_client(alice), "PATCH", path, {})) == (400, "bad_request")


def test_room_detail_json_for_members_only(
    bob: User, carol: User, staff: User, secret: Room
) -> None:
    status, body = call(csrf_client(bob), "GET", f"{API}secret/")
    assert status == 200
    assert body["members"] == ["alice", "bob"] and body["may_manage"] is False
    assert code(call(csrf_client(carol), "GET", f"{API}secret/")) == (403, "forbidden")
    # Staff outside the private room manage it: they see it, with nothing counted as unread.
    Room.objects.filter(pk=secret.pk).update(last_seq=7)
    status, body = call(csrf_client(staff), "GET", f"{API}secret/")
    assert (status, body["may_manage"], body["unread"], body["member_count"]) == (200, True, 0, 2)
    assert call(csrf_client(bob), "GET", f"{API}secret/")[1]["unread"] == 7


# --- members ---------------------------------------------------------------------------------


def test_invite_access_and_errors(alice: User, bob: User, carol: User, secret: Room) -> None:
    path = f"{API}secret/members/"
    assert code(call(csrf_client(bob), "POST", path, {"username": "carol"})) == (403, "forbidden")
    assert code(call(csrf_client(carol), "POST", path, {"username": "carol"})) == (
        403,
        "forbidden",
    )
    owner = csrf_client(alice)
    assert code(call(owner, "POST", path, {"username": "nobody"})) == (404, "not_found")
    assert code(call(owner, "POST", path, {"username": "bob"})) == (409, "already_member")
    assert code(call(owner, "POST", path, {"user": "carol"})) == (400, "bad_request")
    assert call(owner, "POST", path, {"username": "carol"}) == (
        201,
        {"room": "secret", "username": "carol"},
    )
    # The invited user now sees the private room, in the list and on its page.
    listed = call(csrf_client(carol), "GET", API)[1]["rooms"]
    assert [r["slug"] for r in listed] == ["secret"]
    assert listed[0]["member_count"] == 3
    assert csrf_client(carol).get("/chat/secret/").status_code == 200


def test_remove_access(alice: User, bob: User, carol: User, secret: Room) -> None:
    Membership.objects.create(room=secret, user=carol)
    # A member removes no one but themselves; outsiders nobody.
    assert code(call(csrf_client(bob), "DELETE", f"{API}secret/members/carol/")) == (
        403,
        "forbidden",
    )
    outsider = User.objects.create_user("dave", password="x")
    assert code(call(csrf_client(outsider), "DELETE", f"{API}secret/members/bob/")) == (
        403,
        "forbidden",
    )
    # The owner removes anyone but stays.
    assert call(csrf_client(alice), "DELETE", f"{API}secret/members/carol/") == (204, None)
    assert code(call(csrf_client(alice), "DELETE", f"{API}secret/members/alice/")) == (
        409,
        "owner_stays",
    )
    assert code(call(csrf_client(alice), "DELETE", f"{API}secret/members/carol/")) == (
        404,
        "not_found",
    )
    # A member leaves.
    assert call(csrf_client(bob), "DELETE", f"{API}secret/members/bob/") == (204, None)
    left = Membership.objects.filter(room=secret).values_list("user__username", flat=True)
    assert list(left) == ["alice"]


def test_staff_remove_from_a_private_room_they_are_not_in(staff: User, secret: Room) -> None:
    assert call(csrf_client(staff), "DELETE", f"{API}secret/members/bob/") == (204, None)
    assert not Membership.objects.filter(room=secret, user__username="bob").exists()


def test_wrong_method_is_405_json(alice: User) -> None:
    response = csrf_client(alice).put(API)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


# --- pages -----------------------------------------------------------------------------------


def test_private_room_page_says_who_owns_it(carol: User, secret: Room) -> None:
    response = csrf_client(carol).get("/chat/secret/")
    assert response.status_code == 403
    page = response.content.decode()
    assert "Secret is a private room" in page
    assert 'data-testid="room-owner">alice<' in page


def test_owner_sees_the_panel_and_members_do_not(alice: User, bob: User, secret: Room) -> None:
    assert 'data-testid="owner-panel"' in csrf_client(alice).get("/chat/secret/").content.decode()
    page = csrf_client(bob).get("/chat/secret/").content.decode()
    assert 'data-testid="owner-panel"' not in page
    assert 'data-testid="leave-room"' in page


def test_room_list_page_caps_the_badge(alice: User, secret: Room) -> None:
    Room.objects.filter(pk=secret.pk).update(last_seq=150)
    page = csrf_client(alice).get("/chat/").content.decode()
    assert ">99+</span>" in page
    assert 'data-testid="new-room"' in page
    assert call(csrf_client(alice), "GET", API)[1]["rooms"][0]["unread"] == 150


def _many_rooms(count: int, private_every: int = 0, member: User | None = None) -> None:
    Room.objects.bulk_create(
        Room(
            slug=f"r{n:03d}",
            title=f"Room {n}",
            is_private=bool(private_every) and n % private_every == 0,
        )
        for n in range(count)
    )
    if member is not None and private_every:
        private = Room.objects.filter(is_private=True, slug__startswith="r").order_by("slug")
        Membership.objects.bulk_create(Membership(room=r, user=member) for r in private[:2])


def test_the_room_list_comes_in_bounded_pages_that_walk_every_room(alice: User, bob: User) -> None:
    # A site with more rooms than a page: every poll of every tab reads one page, not all.
    _many_rooms(25, private_every=5, member=bob)
    client = csrf_client(bob)
    with override_settings(CHAT_ROOM_LIST_PAGE_SIZE=10):
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            path = API if after is None else f"{API}?after={after}"
            status, body = call(client, "GET", path)
            assert status == 200 and len(body["rooms"]) <= 10
            seen += [room["slug"] for room in body["rooms"]]
            pages += 1
            if not body["has_more"]:
                assert body["next_after"] is None
                break
            after = body["next_after"]
            assert after == body["rooms"][-1]["slug"]
        # limit only lowers the page size.
        assert len(call(client, "GET", f"{API}?limit=3")[1]["rooms"]) == 3
        assert len(call(client, "GET", f"{API}?limit=500")[1]["rooms"]) == 10
    visible = sorted(
        slug
        for slug, private in Room.objects.values_list("slug", "is_private")
        if not private or slug in ("r000", "r005")
    )
    assert seen == visible and pages == 3  # 20 public + bob's 2 private, once each, in order


@pytest.mark.parametrize(
    "query",
    ["after=bad%20slug", "after=" + "a" * 65, "limit=0", "limit=-1", "limit=x", "limit=1e3"],
)
def test_bad_room_list_params_are_400(alice: User, query: str) -> None:
    status, body = call(csrf_client(alice), "GET", f"{API}?{query}")
    assert status == 400 and body["error"]["code"] == "bad_request"
    assert body["error"]["field"] == query.split("=")[0]


def test_the_room_list_page_links_to_the_next_page_and_polls_its_own(alice: User) -> None:
    _many_rooms(15)
    client = csrf_client(alice)
    with override_settings(CHAT_ROOM_LIST_PAGE_SIZE=10):
        first = client.get("/chat/").content.decode()
        assert first.count('<li data-room="') == 10
        assert 'href="/chat/?after=r009"' in first and 'data-testid="rooms-first"' not in first
        assert 'data-api-url="/chat/api/rooms/"' in first
        second = client.get("/chat/?after=r009").content.decode()
        assert second.count('<li data-room="') == 5
        assert 'data-testid="rooms-more"' not in second
        assert 'data-testid="rooms-first"' in second
        assert 'data-api-url="/chat/api/rooms/?after=r009"' in second
        # A hand-edited address shows the first page.
        assert client.get("/chat/?after=no%20such").content.decode().count('<li data-room="') == 10


def test_styled_error_pages(alice: User) -> None:
    # pytest-django runs with DEBUG off: these are the pages users see.
    response = csrf_client(alice).get("/chat/no-such-room/")
    assert response.status_code == 404
    assert "Nothing here" in response.content.decode()
    assert "Something went wrong" in render_to_string("500.html")
    assert "You may not open this page" in render_to_string("403.html")


def test_admin_membership_inline_uses_autocomplete(secret: Room) -> None:
    admin = User.objects.create_superuser("root", password="x")
    client = Client()
    client.force_login(admin)
    page = client.get(f"/admin/chat/room/{secret.pk}/change/").content.decode()
    assert "admin-autocomplete" in page
    assert 'name="memberships-0-user"' in page
    assert 'name="last_seq"' not in page  # read-only
    found = client.get(
        "/admin/autocomplete/",
        {"term": "bo", "app_label": "chat", "model_name": "membership", "field_name": "user"},
    ).json()
    assert [r["text"] for r in found["results"]] == ["bob"]


# --- live removal ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_removing_a_member_closes_their_open_socket() -> None:
    alice = await database_sync_to_async(User.objects.create_user)("alice", password="x")
    bob = await database_sync_to_async(User.objects.create_user)("bob", password="x")

    @database_sync_to_async
    def make_secret() -> None:
        room = Room.objects.create(slug="secret", title="S", is_private=True, owner=alice)
        Membership.objects.create(room=room, user=alice)
        Membership.objects.create(room=room, user=bob)

    await make_secret()
    owner_socket = await connected(alice, "secret")
    removed_socket = await connected(bob, "secret")
    client = AsyncClient(enforce_csrf_checks=True)
    await client.aforce_login(alice)
    await client.get("/accounts/login/")
    response = await client.delete(
        f"{API}secret/members/bob/", headers={"X-CSRFToken": client.cookies["csrftoken"].value}
    )
    assert response.status_code == 204
    while True:
        output = await removed_socket.receive_output(timeout=TIMEOUT)
        if output["type"] == "websocket.close":
            break
    assert output["code"] == protocol.CLOSE_FORBIDDEN
    await owner_socket.send_to(text_data=json.dumps({"type": "ping"}))
    while True:
        data = json.loads(await owner_socket.receive_from(timeout=TIMEOUT))
        frames = data if isinstance(data, list) else [data]
        if any(f["type"] == "pong" for f in frames):
            break
    await owner_socket.disconnect()
