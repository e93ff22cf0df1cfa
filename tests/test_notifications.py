"""In-process tests of the notifications app: notify(), the JSON API, the stream view through
Django's real ASGI handler, admin, the management command, mentions and system checks.

The in-memory channel layer is the one every process has; the end-to-end tests in
tests/test_e2e_notifications.py cover real daphne processes and Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import timedelta
from http.cookies import SimpleCookie
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth.models import Group, User
from django.core.asgi import get_asgi_application
from django.core.management import CommandError, call_command
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from chat import services as chat_services
from chat.mentions import mentioned_usernames
from chat.models import Membership, MentionLog, Room
from notifications import anotify, notify, protocol, services
from notifications.checks import check_notifications_settings
from notifications.hub import (
    UNKNOWN_START,
    Ended,
    Range,
    Subscription,
    UnreadChanged,
    get_hub,
)
from notifications.models import Notification
from notifications.streams import active_streams

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
WAIT_SECONDS = 5


@pytest.fixture(autouse=True)
def _in_memory_layer() -> Iterator[None]:
    # Whatever the shell exports (REDIS_URL), in-process tests use the in-memory layer.
    with override_settings(CHANNEL_LAYERS=IN_MEMORY):
        yield


def make_users(count: int, prefix: str = "user") -> list[User]:
    return User.objects.bulk_create(User(username=f"{prefix}{i}") for i in range(count))


def layer_messages(channel: str) -> list[dict[str, Any]]:
    """Every message waiting on an in-memory layer channel (read without blocking)."""
    layer = get_channel_layer()
    queue = layer.channels.get(channel)
    found = []
    while queue is not None and not queue.empty():
        _, message = queue.get_nowait()
        found.append(message)
    return found


def listen() -> str:
    """Join the notifications group with a fresh channel; return its name."""
    layer = get_channel_layer()
    channel = "test.listener!x"
    async_to_sync(layer.group_add)(services.GROUP, channel)
    return channel


# --- notify() ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_notify_accepts_a_user_ids_lists_and_querysets() -> None:
    alice, bob, carol = make_users(3)
    assert notify(alice, "one") == 1
    assert notify([alice, bob.pk, alice], "two") == 2  # duplicates collapse
    assert notify(User.objects.filter(pk__in=[bob.pk, carol.pk]), "three") == 2
    assert notify(User.objects.none(), "nobody") == 0
    assert notify([999_999], "ghost") == 0  # users that do not exist are skipped
    rows = Notification.objects.order_by("id").values_list("recipient_id", "title")
    assert list(rows) == [
        (alice.pk, "one"),
        (alice.pk, "two"),
        (bob.pk, "two"),
        (bob.pk, "three"),
        (carol.pk, "three"),
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"title": ""}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": "t", "level": "loud"}, "level"),
        ({"title": "t", "url": "javascript:alert(1)"}, "url"),
        ({"title": "t", "url": "//evil.example/"}, "url"),
        ({"title": "t", "url": "/x\n/"}, "url"),
        ({"title": "t", "body": "nul\x00"}, "NUL"),
    ],
)
def test_notify_validates(kwargs: dict[str, str], message: str) -> None:
    (alice,) = make_users(1)
    with pytest.raises(ValueError, match=message):
        notify(alice, **kwargs)
    assert not Notification.objects.exists()


@pytest.mark.django_db
def test_notify_refuses_other_models() -> None:
    with pytest.raises(TypeError):
        notify(Group.objects.all(), "x")
    with pytest.raises(TypeError):
        notify(["alice"], "x")  # type: ignore[list-item]


@pytest.mark.django_db
def test_urls_that_are_accepted() -> None:
    (alice,) = make_users(1)
    for url in ["", "/chat/lobby/#seq-4", "https://example.com/a?b=c", "http://x.test/"]:
        notify(alice, "t", url=url)
    assert Notification.objects.count() == 4


@pytest.mark.django_db
@override_settings(NOTIFICATIONS_BATCH_SIZE=300)
def test_notify_to_1000_users_is_a_bulk_operation(
    django_assert_max_num_queries: Any, django_capture_on_commit_callbacks: Any
) -> None:
    users = make_users(1000)
    earlier = notify(users[:2], "earlier")
    assert earlier == 2
    previous = dict(Notification.objects.values_list("recipient_id", "id"))
    channel = listen()
    # The user ids, then per batch of 300: one query for the previous ids and the INSERTs
    # (Django splits them at SQLite's 999 parameters: 142 rows each; one on PostgreSQL), and
    # the savepoint. Far from 1,000 round trips.
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        django_assert_max_num_queries(20),
    ):
        assert notify(User.objects.all(), "Hello everyone", body="b", level="success") == 1000
    assert len(callbacks) == 1, "one broadcast for the whole send"
    assert Notification.objects.filter(title="Hello everyone").count() == 1000
    messages = layer_messages(channel)
    assert [m["type"] for m in messages] == [protocol.LAYER_BATCH] * 4  # one per batch
    items = [i for m in messages for i in protocol.parse_batch_items(m["items"])]
    assert len(items) == 1000
    stored = dict(
        Notification.objects.filter(title="Hello everyone").values_list("id", "recipient_id")
    )
    assert {(i.notification_id, i.user_id) for i in items} == set(stored.items())
    for item in items:
        assert item.previous_id == previous.get(item.user_id, 0)
    data = json.loads(protocol.notification_json(items[0].notification_id, messages[0]["tail"]))
    assert data["title"] == "Hello everyone" and data["level"] == "success"
    assert data["read"] is False


@pytest.mark.django_db
def test_nothing_is_published_before_commit(django_capture_on_commit_callbacks: Any) -> None:
    (alice,) = make_users(1)
    channel = listen()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        notify(alice, "later")
        assert layer_messages(channel) == []
    assert len(callbacks) == 1
    callbacks[0]()
    assert [m["type"] for m in layer_messages(channel)] == [protocol.LAYER_BATCH]


@pytest.mark.django_db(transaction=True)
async def test_anotify_from_async_code() -> None:
    (alice,) = await database_sync_to_async(make_users)(1)
    assert await anotify(alice, "async hello", url="/x/") == 1
    assert await Notification.objects.filter(recipient=alice, title="async hello").aexists()


# --- JSON API ------------------------------------------------------------------------------------


@pytest.fixture
def alice_client(db: None) -> tuple[Client, User]:
    alice = User.objects.create_user("alice", password="x")
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    return client, alice


def csrf_headers(client: Client) -> dict[str, str]:
    client.get(reverse("notifications:list"))  # any page; the token comes from the cookie jar
    token = client.cookies.get("csrftoken")
    if token is None:
        client.get("/accounts/login/")
        token = client.cookies["csrftoken"]
    return {"HTTP_X_CSRFTOKEN": token.value}


@pytest.mark.django_db
def test_api_requires_login() -> None:
    client = Client()
    for response in [
        client.get(reverse("notifications:list")),
        client.get(reverse("notifications:stream")),
    ]:
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"


def test_list_shape_and_paging(alice_client: tuple[Client, User]) -> None:
    client, alice = alice_client
    (bob,) = make_users(1, "bob")
    for i in range(5):
        notify(alice, f"n{i}", body="b", url="/u/")
    notify(bob, "not yours")
    data = client.get(reverse("notifications:list"), {"limit": 3}).json()
    assert data["unread"] == 5
    assert data["last_id"] == Notification.objects.filter(recipient=alice).latest("id").pk
    titles = [n["title"] for n in data["notifications"]]
    assert titles == ["n4", "n3", "n2"]
    assert set(data["notifications"][0]) == {
        "id",
        "title",
        "body",
        "url",
        "level",
        "created_at",
        "read",
    }
    before = data["notifications"][-1]["id"]
    older = client.get(reverse("notifications:list"), {"before": before}).json()
    assert [n["title"] for n in older["notifications"]] == ["n1", "n0"]
    assert client.get(reverse("notifications:list"), {"limit": "x"}).status_code == 400


def test_mark_read_and_read_all(alice_client: tuple[Client, User]) -> None:
    client, alice = alice_client
    notify(alice, "a")
    notify(alice, "b")
    first = Notification.objects.filter(recipient=alice).earliest("id")
    url = reverse("notifications:read", args=[first.pk])
    # CSRF protected.
    assert client.post(url).status_code == 403
    headers = csrf_headers(client)
    response = client.post(url, **headers)  # type: ignore[arg-type]
    assert response.status_code == 200
    assert response.json()["unread"] == 1
    first.refresh_from_db()
    assert first.read_at is not None
    # Idempotent.
    assert client.post(url, **headers).json()["unread"] == 1  # type: ignore[arg-type]
    response = client.post(reverse("notifications:read_all"), **headers)  # type: ignore[arg-type]
    assert response.json()["unread"] == 0
    assert not Notification.objects.filter(recipient=alice, read_at__isnull=True).exists()
    assert client.get(reverse("notifications:read_all")).status_code == 405


def test_cannot_mark_someone_elses(alice_client: tuple[Client, User]) -> None:
    client, _ = alice_client
    (bob,) = make_users(1, "bob")
    notify(bob, "private")
    theirs = Notification.objects.get(recipient=bob)
    headers = csrf_headers(client)
    url = reverse("notifications:read", args=[theirs.pk])
    assert client.post(url, **headers).status_code == 404  # type: ignore[arg-type]
    client.post(reverse("notifications:read_all"), **headers)  # type: ignore[arg-type]
    theirs.refresh_from_db()
    assert theirs.read_at is None


# --- the stream through Django's ASGI handler -----------------------------------------------------


class ASGIRequest:
    """One HTTP request to the real ASGI application, read chunk by chunk, then disconnected."""

    def __init__(self, path: str, cookie: str = "", headers: dict[str, str] | None = None):
        path, _, query = path.partition("?")
        raw_headers = [(b"host", b"testserver")]
        if cookie:
            raw_headers.append((b"cookie", cookie.encode()))
        for name, value in (headers or {}).items():
            raw_headers.append((name.lower().encode(), value.encode()))
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": raw_headers,
            "client": ("127.0.0.1", 40000),
            "server": ("testserver", 80),
        }
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = ""

    async def start(self) -> ASGIRequest:
        app = get_asgi_application()
        await self.to_app.put({"type": "http.request", "body": b"", "more_body": False})
        self.task = asyncio.create_task(app(self.scope, self.to_app.get, self.from_app.put))
        start = await asyncio.wait_for(self.from_app.get(), WAIT_SECONDS)
        assert start["type"] == "http.response.start"
        self.status = start["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        return self

    async def read_until(self, text: str) -> str:
        while text not in self.body:
            message = await asyncio.wait_for(self.from_app.get(), WAIT_SECONDS)
            self.body += message.get("body", b"").decode()
            if not message.get("more_body", False):
                break
        assert text in self.body, self.body
        return self.body

    async def disconnect(self) -> None:
        await self.to_app.put({"type": "http.disconnect"})
        assert self.task is not None
        await asyncio.wait_for(self.task, WAIT_SECONDS)


@pytest.fixture
async def alice_cookie(transactional_db: None) -> AsyncIterator[tuple[User, str]]:
    alice = await database_sync_to_async(User.objects.create_user)("alice", password="x")
    client = Client()
    await sync_to_async(client.force_login)(alice)
    cookie = SimpleCookie()
    cookie["sessionid"] = client.cookies["sessionid"].value
    yield alice, cookie.output(header="", attrs=[]).strip()


def notification_ids(body: str) -> list[int]:
    return [
        json.loads(line[len("data: ") :])["id"]
        for block in body.split("\n\n")
        if "event: notification" in block
        for line in block.splitlines()
        if line.startswith("data: ")
    ]


@pytest.mark.django_db(transaction=True)
async def test_stream_refuses_anonymous_and_bad_last_event_id(
    alice_cookie: tuple[User, str],
) -> None:
    anonymous = await ASGIRequest("/notifications/stream/").start()
    assert anonymous.status == 401
    await anonymous.read_until("unauthenticated")
    _, cookie = alice_cookie
    bad = await ASGIRequest("/notifications/stream/?last_event_id=x", cookie).start()
    assert bad.status == 400
    await bad.read_until("bad_last_event_id")
    assert active_streams() == 0


@pytest.mark.django_db(transaction=True)
async def test_stream_first_bytes_replay_and_live(alice_cookie: tuple[User, str]) -> None:
    alice, cookie = alice_cookie
    for i in range(3):
        await anotify(alice, f"old {i}")
    ids = [n async for n in Notification.objects.order_by("id").values_list("id", flat=True)]
    headers = {"Last-Event-ID": str(ids[0])}
    request = await ASGIRequest("/notifications/stream/", cookie, headers).start()
    assert request.status == 200
    assert request.headers["content-type"] == "text/event-stream"
    assert request.headers["cache-control"] == "no-cache"
    assert request.headers["x-accel-buffering"] == "no"
    body = await request.read_until("event: unread")
    assert body.startswith("retry: ")
    assert f'"count":3,"last_id":{ids[-1]}' in body
    await request.read_until(f"id: {ids[-1]}\n")
    await anotify(alice, "live")
    body = await request.read_until('"title":"live"')
    live_id = await Notification.objects.filter(title="live").values_list("id", flat=True).aget()
    assert notification_ids(body) == [ids[1], ids[2], live_id]
    assert active_streams(alice.pk) == 1
    await request.disconnect()
    assert active_streams() == 0


@pytest.mark.django_db(transaction=True)
@override_settings(NOTIFICATIONS_MAX_STREAMS_PER_USER=3)
async def test_connect_disconnect_cycles_release_everything(
    alice_cookie: tuple[User, str],
) -> None:
    _, cookie = alice_cookie
    layer = get_channel_layer()
    for _ in range(50):
        request = await ASGIRequest("/notifications/stream/", cookie).start()
        assert request.status == 200
        await request.read_until("event: unread")
        await request.disconnect()
    assert active_streams() == 0
    hub = get_hub()
    assert not hub.running and hub.subscriptions() == 0
    assert services.GROUP not in layer.groups
    # Every slot is free again: the cap still admits three, and refuses a fourth.
    open_requests = [await ASGIRequest("/notifications/stream/", cookie).start() for _ in range(3)]
    assert [r.status for r in open_requests] == [200, 200, 200]
    refused = await ASGIRequest("/notifications/stream/", cookie).start()
    assert refused.status == 429
    assert refused.headers["retry-after"].isdigit()
    body = json.loads(await refused.read_until("}"))
    assert body["error"]["code"] == "too_many_streams" and body["error"]["limit"] == 3
    for request in open_requests:
        await request.read_until("event: unread")
        await request.disconnect()
    assert active_streams() == 0
    assert not get_hub().running
    assert services.GROUP not in layer.groups


@pytest.mark.django_db(transaction=True)
@override_settings(NOTIFICATIONS_POLL_SECONDS=0.2, CHANNEL_LAYERS={})
async def test_without_a_layer_the_poll_delivers(alice_cookie: tuple[User, str]) -> None:
    alice, cookie = alice_cookie
    request = await ASGIRequest("/notifications/stream/", cookie).start()
    await request.read_until("event: unread")
    await anotify(alice, "found by the poll")
    await request.read_until("found by the poll")
    await request.disconnect()


@pytest.mark.django_db(transaction=True)
@override_settings(NOTIFICATIONS_POLL_SECONDS=600, CHANNEL_LAYERS={})
async def test_out_of_order_live_events_are_filled_from_the_database(
    alice_cookie: tuple[User, str],
) -> None:
    """Processes publish independently: a later id may arrive first. No gap, no duplicate."""
    alice, cookie = alice_cookie
    request = await ASGIRequest("/notifications/stream/", cookie).start()
    await request.read_until("event: unread")
    # No layer: notify() stores and publishes nothing; the test delivers the layer messages.
    await anotify(alice, "A")
    await anotify(alice, "B")
    a, b = [n async for n in Notification.objects.order_by("id")]
    tail_a = protocol.tail_of(a)
    tail_b = protocol.tail_of(b)
    message_a = protocol.batch_message(tail_a, [protocol.BatchItem(alice.pk, a.pk, 0)])
    message_b = protocol.batch_message(tail_b, [protocol.BatchItem(alice.pk, b.pk, a.pk)])
    hub = get_hub()
    hub.dispatch(message_b)  # B first: its previous id (A) was never sent, so read A too
    body = await request.read_until('"title":"B"')
    hub.dispatch(message_a)  # late: already sent
    hub.dispatch(message_b)  # duplicate
    await anotify(alice, "C")
    c = await Notification.objects.aget(title="C")
    hub.dispatch(
        protocol.batch_message(protocol.tail_of(c), [protocol.BatchItem(alice.pk, c.pk, b.pk)])
    )
    body = await request.read_until('"title":"C"')
    assert notification_ids(body) == [a.pk, b.pk, c.pk]
    await request.disconnect()


async def test_a_subscription_that_overflows_falls_back_to_the_database() -> None:
    sub = Subscription(user_id=1, limit=3)
    for i in range(1, 6):
        sub.put(Range(i - 1, i, [(i, "{}")]))
    sub.put(UnreadChanged())
    sub.put(UnreadChanged())  # coalesced
    items = [await sub.get() for _ in range(sub.pending())]
    assert items == [Range(UNKNOWN_START, 4, None), Range(4, 5, [(5, "{}")]), UnreadChanged()]


async def test_a_waiting_subscription_wakes_for_an_item_and_ends_before_what_is_queued() -> None:
    sub = Subscription(user_id=1, limit=3)
    waiting = asyncio.ensure_future(sub.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    sub.put(Range(0, 1, [(1, "{}")]))
    assert await asyncio.wait_for(waiting, 5) == Range(0, 1, [(1, "{}")])
    waiting = asyncio.ensure_future(sub.get())
    await asyncio.sleep(0)
    sub.end()
    assert await asyncio.wait_for(waiting, 5) == Ended()
    sub.put(Range(1, 2, [(2, "{}")]))  # ignored once ended
    assert await sub.get() == Ended() and sub.pending() == 0


# --- admin ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_send_view(admin_client: Client) -> None:
    alice, bob, carol = make_users(3)
    group = Group.objects.create(name="team")
    group.user_set.add(alice, bob)
    url = reverse("admin:notifications_notification_send")
    assert admin_client.get(url).status_code == 200
    changelist = admin_client.get(reverse("admin:notifications_notification_changelist"))
    assert url in changelist.content.decode()
    response = admin_client.post(
        url, {"audience": "group", "group": group.pk, "title": "Team", "level": "info"}
    )
    assert response.status_code == 302
    assert set(Notification.objects.values_list("recipient_id", flat=True)) == {alice.pk, bob.pk}
    response = admin_client.post(
        url, {"audience": "users", "usernames": "user2, nobody", "title": "x", "level": "info"}
    )
    assert response.status_code == 200 and b"No such users: nobody" in response.content
    admin_client.post(
        url, {"audience": "users", "usernames": "user2", "title": "Carol", "level": "info"}
    )
    assert Notification.objects.get(title="Carol").recipient == carol
    admin_client.post(url, {"audience": "all", "title": "All", "level": "warning"})
    # Every active user, the admin included.
    assert Notification.objects.filter(title="All").count() == User.objects.count()
    response = admin_client.post(
        url, {"audience": "all", "title": "bad", "level": "info", "url": "javascript:x"}
    )
    assert response.status_code == 200
    assert not Notification.objects.filter(title="bad").exists()


@pytest.mark.django_db
def test_admin_action_on_users(admin_client: Client) -> None:
    alice, bob, _ = make_users(3)
    changelist = reverse("admin:auth_user_changelist")
    selected = {"action": "send_notification", "_selected_action": [alice.pk, bob.pk]}
    page = admin_client.post(changelist, selected)
    assert page.status_code == 200
    assert b"2 users will get this notification" in page.content
    response = admin_client.post(
        changelist, {**selected, "apply": "1", "title": "Picked", "level": "info", "index": "0"}
    )
    assert response.status_code == 302
    picked = Notification.objects.filter(title="Picked").values_list("recipient_id", flat=True)
    assert sorted(picked) == sorted([alice.pk, bob.pk])


@pytest.mark.django_db
def test_admin_changelist_search_and_filters(admin_client: Client) -> None:
    (alice,) = make_users(1)
    notify(alice, "findme")
    url = reverse("admin:notifications_notification_changelist")
    assert b"findme" in admin_client.get(url, {"q": "findme"}).content
    assert b"findme" in admin_client.get(url, {"read": "no", "level": "info"}).content
    assert b"findme" not in admin_client.get(url, {"read": "yes"}).content


@pytest.mark.django_db
def test_staff_without_permission_cannot_send() -> None:
    staff = User.objects.create_user("staff", password="x", is_staff=True)
    client = Client()
    client.force_login(staff)
    response = client.get(reverse("admin:notifications_notification_send"))
    assert response.status_code == 403


# --- manage.py notify ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_notify_command() -> None:
    _, bob, _ = make_users(3)
    Group.objects.create(name="g").user_set.add(bob)
    call_command("notify", "--user", "user0", "--user", "user1", "--title", "T", "--body", "B")
    assert Notification.objects.filter(title="T").count() == 2
    call_command("notify", "--group", "g", "--title", "G", "--url", "/x/", "--level", "error")
    assert Notification.objects.get(title="G").recipient == bob
    call_command("notify", "--all", "--title", "A")
    assert Notification.objects.filter(title="A").count() == 3
    with pytest.raises(CommandError, match="No such users"):
        call_command("notify", "--user", "ghost", "--title", "T")
    with pytest.raises(CommandError, match="url"):
        call_command("notify", "--all", "--title", "T", "--url", "javascript:x")
    with pytest.raises(CommandError):
        call_command("notify", "--title", "no recipients")


# --- @mentions -----------------------------------------------------------------------------------


def test_mentioned_usernames() -> None:
    assert mentioned_usernames("hi @bob and @carol.", 20) == ["bob", "carol.", "carol"]
    assert mentioned_usernames("mail me@example.com", 20) == []
    assert mentioned_usernames("@a.b-c_d+e@f", 20) == ["a.b-c_d+e@f"]
    assert mentioned_usernames("@x @x @x", 20) == ["x"]
    assert len(mentioned_usernames(" ".join(f"@u{i}" for i in range(100)), 5)) == 10


@pytest.mark.django_db(transaction=True)
def test_mentions_in_chat_notify_members_only() -> None:
    alice = User.objects.create_user("alice")
    bob = User.objects.create_user("bob")
    carol = User.objects.create_user("carol")
    lobby = Room.objects.create(slug="lobby", title="Lobby")
    secret = Room.objects.create(slug="secret", title="Secret", is_private=True)
    Membership.objects.create(room=secret, user=alice)
    Membership.objects.create(room=secret, user=carol)
    result = chat_services.post_message(lobby.pk, alice, "hey @bob, @alice and @nobody!")
    (mention,) = Notification.objects.all()
    assert mention.recipient == bob  # not the author, not unknown names
    assert mention.url == f"/chat/lobby/#seq-{result.message.seq}"
    assert "alice" in mention.title and mention.body == "hey @bob, @alice and @nobody!"
    chat_services.post_message(secret.pk, alice, "@bob @carol")
    assert list(Notification.objects.filter(url__startswith="/chat/secret/")) == [
        Notification.objects.get(recipient=carol)
    ]


def mention_all(users: list[User]) -> str:
    return " ".join(f"@{user.username}" for user in users)


def notified_by(author: str) -> list[str]:
    """Usernames of the recipients of ``author``'s mentions, oldest first."""
    mentions = Notification.objects.filter(title__startswith=f"{author} mentioned you")
    return list(mentions.order_by("id").values_list("recipient__username", flat=True))


@pytest.mark.django_db(transaction=True)
def test_one_message_notifies_at_most_max_mentions() -> None:
    alice = User.objects.create_user("alice")
    users = make_users(12)
    lobby = Room.objects.create(slug="lobby", title="Lobby")
    # Mentioned in reverse: the first five mentioned win, not the five oldest accounts.
    chat_services.post_message(lobby.pk, alice, mention_all(users[::-1]))
    assert sorted(notified_by("alice")) == sorted(u.username for u in users[-5:])
    with override_settings(CHAT_MAX_MENTIONS=2):
        chat_services.post_message(lobby.pk, alice, mention_all(users))
    assert notified_by("alice")[5:] == ["user0", "user1"]


@pytest.mark.django_db(transaction=True)
@override_settings(CHAT_MENTION_RATE_LIMIT=7, CHAT_MENTION_RATE_LIMIT_WINDOW_SECONDS=60)
def test_mentions_of_one_sender_are_limited_per_window() -> None:
    alice = User.objects.create_user("alice")
    bob = User.objects.create_user("bob")
    users = make_users(9)
    lobby = Room.objects.create(slug="lobby", title="Lobby")
    for start in (0, 3, 6):
        chat_services.post_message(lobby.pk, alice, mention_all(users[start : start + 3]))
    chat_services.post_message(lobby.pk, alice, mention_all(users))
    # 3 + 3, then 1 of the third message's 3; the fourth message finds no budget left.
    assert notified_by("alice") == [u.username for u in users[:7]]
    # Another sender has a budget of their own.
    chat_services.post_message(lobby.pk, bob, "@user8")
    assert notified_by("bob") == ["user8"]
    # Once the window has passed, alice may mention again.
    MentionLog.objects.update(created_at=timezone.now() - timedelta(seconds=61))
    chat_services.post_message(lobby.pk, alice, "@user8 @user7")
    assert sorted(notified_by("alice")[7:]) == ["user7", "user8"]


@pytest.mark.django_db(transaction=True)
def test_the_assistant_is_never_mentioned_and_mentions_nobody() -> None:
    alice = User.objects.create_user("alice")
    User.objects.create_user("bob")
    assistant = User.objects.create_user("assistant")  # CHAT_ASSISTANT_USERNAME
    lobby = Room.objects.create(slug="lobby", title="Lobby")
    chat_services.post_message(lobby.pk, alice, "@assistant what does @bob think?")
    assert notified_by("alice") == ["bob"]
    # Its replies say what the requester asked for: mentions in them would notify people on
    # its behalf, outside the requester's limits.
    chat_services.post_message(lobby.pk, assistant, "@bob @alice: see above", check_rate=False)
    assert notified_by("assistant") == []
    with override_settings(CHAT_ASSISTANT_USERNAME="helper"):
        User.objects.create_user("helper")
        chat_services.post_message(lobby.pk, alice, "@helper @assistant")
    assert notified_by("alice") == ["bob", "assistant"]


@pytest.mark.django_db(transaction=True)
def test_chat_works_without_notifications_installed(settings: Any) -> None:
    alice = User.objects.create_user("alice")
    User.objects.create_user("bob")
    lobby = Room.objects.create(slug="lobby", title="Lobby")
    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "notifications"]
    chat_services.post_message(lobby.pk, alice, "hi @bob")
    settings.INSTALLED_APPS = [*settings.INSTALLED_APPS, "notifications"]
    assert not Notification.objects.exists()


# --- checks --------------------------------------------------------------------------------------


@override_settings(NOTIFICATIONS_KEEPALIVE_SECONDS=0, NOTIFICATIONS_MAX_STREAMS_PER_USER=-1)
def test_checks_refuse_bad_settings() -> None:
    errors = check_notifications_settings()
    assert {e.id for e in errors} == {"notifications.E001"}
    assert len(errors) == 2


@override_settings(CHAT_MENTION_RATE_LIMIT=-1, CHAT_MENTION_RATE_LIMIT_WINDOW_SECONDS=0)
def test_checks_refuse_bad_mention_limits() -> None:
    from chat.checks import check_chat_settings

    errors = [e for e in check_chat_settings() if e.id in ("chat.E005", "chat.E001")]
    assert sorted(str(e.id) for e in errors) == ["chat.E001", "chat.E005"]
    assert any("CHAT_MENTION_RATE_LIMIT " in e.msg for e in errors)
    assert any("CHAT_MENTION_RATE_LIMIT_WINDOW_SECONDS" in e.msg for e in errors)


@override_settings(NOTIFICATIONS_MAX_MENTIONS=3)
def test_the_old_mention_setting_names_are_a_warning() -> None:
    from chat.checks import check_chat_settings

    (warning,) = [e for e in check_chat_settings() if e.id == "chat.W003"]
    assert "NOTIFICATIONS_MAX_MENTIONS" in warning.msg
    assert warning.hint is not None and "CHAT_MAX_MENTIONS" in warning.hint


@override_settings(CHANNEL_LAYERS={})
def test_checks_warn_without_a_layer() -> None:
    assert [e.id for e in check_notifications_settings()] == ["notifications.W001"]


def test_default_settings_pass_checks() -> None:
    assert check_notifications_settings() == []


def test_checks_refuse_a_bad_redis_url_and_warn_about_per_process_caps() -> None:
    with override_settings(
        NOTIFICATIONS_REDIS_URL="localhost:6379", NOTIFICATIONS_LEASE_TTL_SECONDS=0
    ):
        ids = sorted(e.id or "" for e in check_notifications_settings())
    assert ids == ["notifications.E001", "notifications.E002"]
    redis_layer = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer"}}
    with override_settings(CHANNEL_LAYERS=redis_layer, NOTIFICATIONS_REDIS_URL=""):
        assert [e.id for e in check_notifications_settings()] == ["notifications.W004"]
    with override_settings(CHANNEL_LAYERS=redis_layer, NOTIFICATIONS_REDIS_URL="redis://h/0"):
        assert check_notifications_settings() == []
