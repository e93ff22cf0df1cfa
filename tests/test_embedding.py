"""What a host site relies on: the socket path setting, scoped CSS, the one-block template
contract, the health view, and what deleting a user does to their messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db.models import ProtectedError
from django.test import Client, override_settings

from chat.models import Membership, Message, ReadMarker, Room
from realtime_kit.asgi import get_asgi_application

CHAT_DIR = Path(__file__).resolve().parent.parent / "chat"
# The blocks the app's pages fill: the contract with the host's layout (docs/embedding.md).
CONTRACT_BLOCKS = {"title", "content"}


@pytest.mark.django_db(transaction=True)
async def test_the_socket_path_follows_the_prefix_setting_in_routes_and_page() -> None:
    user = await get_user_model().objects.acreate(username="dora")
    await Room.objects.acreate(slug="lobby", title="Lobby")
    client = Client()
    await sync_to_async(client.force_login)(user)
    with override_settings(CHAT_WEBSOCKET_PREFIX="community/ws/chat/"):
        page = await sync_to_async(client.get)("/chat/lobby/")
        application = get_asgi_application()
    assert 'data-ws-path="/community/ws/chat/lobby/"' in page.content.decode()
    headers = [
        (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()),
        (b"origin", b"http://testserver"),
        (b"host", b"testserver"),
    ]
    moved = WebsocketCommunicator(application, "/community/ws/chat/lobby/", headers=headers)
    connected, _ = await moved.connect(timeout=5)
    assert connected
    first = await moved.receive_json_from(timeout=5)
    assert first["type"] == "hello"
    await moved.disconnect()
    # The old path is no route any more: accepted and closed with 4404.
    old = WebsocketCommunicator(application, "/ws/chat/lobby/", headers=headers)
    await old.connect(timeout=5)
    assert (await old.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4404}


def test_chat_js_takes_the_socket_path_from_the_page() -> None:
    source = (CHAT_DIR / "static/chat/chat.js").read_text()
    assert "el.dataset.wsPath ||" in source


@pytest.mark.parametrize("stylesheet", ["chat.css", "assistant.css", "rooms.css"])
def test_every_css_rule_is_scoped_to_the_apps_root_element(stylesheet: str) -> None:
    css = re.sub(r"/\*.*?\*/", "", (CHAT_DIR / "static/chat" / stylesheet).read_text(), flags=re.S)
    css = re.sub(r"@keyframes[^{]*\{([^{}]*\{[^}]*\})*[^}]*\}", "", css)
    # A media query only says when its rules apply: the rules inside it are checked.
    css = re.sub(r"@media[^{]*\{", "", css)
    selectors = [s.strip() for rule in re.findall(r"([^{}]+)\{", css) for s in rule.split(",")]
    assert selectors, "no rules parsed"
    assert [s for s in selectors if not s.startswith(".rtk-chat")] == []


def test_the_apps_pages_fill_only_the_contract_blocks_and_have_the_root_element() -> None:
    for page in (CHAT_DIR / "templates/chat").glob("*.html"):
        if page.name == "base.html":
            continue
        source = page.read_text()
        if "{% extends" not in source:
            continue  # a partial, included inside a page's root element
        blocks = set(re.findall(r"{%\s*block\s+(\w+)", source))
        assert blocks <= CONTRACT_BLOCKS, (page.name, blocks)
        assert 'class="rtk-chat"' in source, page.name


@pytest.mark.django_db
def test_the_health_view_answers_ok_with_a_database() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": True}


@pytest.mark.django_db
def test_a_user_with_messages_cannot_be_deleted_but_one_without_can() -> None:
    User = get_user_model()
    writer = User.objects.create_user(username="writer")
    reader = User.objects.create_user(username="reader")
    room = Room.objects.create(slug="r", title="R", last_seq=1)
    Message.objects.create(room=room, seq=1, user=writer, text="kept")
    for user in (writer, reader):
        Membership.objects.create(room=room, user=user)
        ReadMarker.objects.create(room=room, user=user, last_read_seq=1)
    # The room's history is the record: deleting its author is refused, nothing is removed.
    with pytest.raises(ProtectedError):
        writer.delete()
    assert Message.objects.filter(user=writer).count() == 1
    assert Membership.objects.filter(user=writer).exists()
    # Memberships and read markers go with a user who wrote nothing.
    reader.delete()
    assert not Membership.objects.filter(user_id=reader.pk).exists()
    assert not ReadMarker.objects.filter(user_id=reader.pk).exists()


@pytest.mark.django_db
def test_the_admin_explains_why_a_writer_cannot_be_deleted() -> None:
    User = get_user_model()
    admin = User.objects.create_superuser(username="root", password="x")
    writer = User.objects.create_user(username="writer")
    room = Room.objects.create(slug="r", title="R", last_seq=1)
    Message.objects.create(room=room, seq=1, user=writer, text="kept")
    client = Client()
    client.force_login(admin)
    page = client.get(f"/admin/auth/user/{writer.pk}/delete/")
    assert page.status_code == 200
    assert "protected" in page.content.decode().lower()
    assert client.post(f"/admin/auth/user/{writer.pk}/delete/", {"post": "yes"}).status_code in (
        200,
        403,
    )
    assert User.objects.filter(pk=writer.pk).exists()


def test_no_template_has_a_multi_line_short_comment() -> None:
    # Django's {# … #} is one line only: across lines it is shown on the page as text.
    roots = [CHAT_DIR / "templates", CHAT_DIR.parent / "notifications/templates"]
    roots.append(CHAT_DIR.parent / "templates")
    leaking = [
        str(path)
        for root in roots
        for path in root.rglob("*.html")
        if any("\n" in c for c in re.findall(r"\{#(.*?)#\}", path.read_text(), flags=re.S))
    ]
    assert leaking == []
