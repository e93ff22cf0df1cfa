"""End-to-end smoke of the community host, run with the host venv's Python from this folder.

    COMMUNITY_DB=/tmp/x.sqlite3 COMMUNITY_APPS=chat,notifications python smoke.py

Migrates, checks, creates the demo members with ``chat_demo``, starts a live daphne
(``chat.testing.live_server``) and drives the site as browsers would: pages and static files,
two members' sockets (messages, presence, a mention), the notification stream, an assistant
reply from the offline demo backend, the export and the admin. Prints one ``SMOKE {json}``
line with what it saw; any failed expectation exits non-zero with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "community_site.settings")
django.setup()

import httpx  # noqa: E402
from django.apps import apps  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

PREFIX = "/community"
PASSWORD = "community-pass-1"
WAIT_SECONDS = 15.0
HAS_CHAT = apps.is_installed("chat")
HAS_NOTIFICATIONS = apps.is_installed("notifications")
seen: dict[str, Any] = {"django": django.get_version(), "python": sys.version.split()[0]}


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"SMOKE FAILED: {what}")


def prepare() -> None:
    call_command("migrate", interactive=False, verbosity=0)
    call_command("check", fail_level="WARNING")  # the wiring and every app setting
    User = get_user_model()
    if HAS_CHAT:
        # The demo command with a user model that logs in with an e-mail.
        call_command("chat_demo", password=PASSWORD, verbosity=0)
    else:
        for name in ("alice", "bob"):
            User.objects.create_user(f"{name}@example.com", PASSWORD)
    User.objects.create_superuser("admin@example.com", PASSWORD)
    seen["members"] = sorted(User.objects.values_list("email", flat=True))


def login(base_url: str, email: str) -> httpx.Client:
    client = httpx.Client(base_url=base_url, timeout=10)
    client.get(f"{PREFIX}/accounts/login/")
    response = client.post(
        f"{PREFIX}/accounts/login/",
        data={
            "username": email,
            "password": PASSWORD,
            "csrfmiddlewaretoken": client.cookies["csrftoken"],
        },
    )
    expect(response.status_code == 302, f"login of {email}: {response.status_code}")
    return client


class Socket:
    """A chat socket whose frames (batched or not) are read one by one."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def wait(self, predicate: Any, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            for frame in self.frames:
                if predicate(frame):
                    self.frames.remove(frame)
                    return frame
            remaining = deadline - time.monotonic()
            expect(remaining > 0, f"no {what}; got {[f.get('type') for f in self.frames]}")
            try:
                data = json.loads(await asyncio.wait_for(self.ws.recv(), remaining))
            except TimeoutError:
                continue
            self.frames.extend(data if isinstance(data, list) else [data])


async def open_socket(base_url: str, client: httpx.Client, path: str) -> Socket:
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    ws = await connect(
        base_url.replace("http", "ws", 1) + path,
        additional_headers={"Cookie": cookie},
        origin=base_url,  # type: ignore[arg-type]
    )
    return Socket(ws)


def check_pages(base_url: str, alice: httpx.Client) -> str:
    page = alice.get(f"{PREFIX}/chat/lobby/")
    expect(page.status_code == 200, f"room page: {page.status_code}")
    html = page.text
    expect('id="community-header"' in html, "the room page is not inside the site's layout")
    expect('class="rtk-chat"' in html, "no .rtk-chat root element")
    marker = 'data-ws-path="'
    ws_path = html[html.index(marker) + len(marker) :].split('"', 1)[0]
    expect(ws_path == f"{PREFIX}/ws/chat/lobby/", f"socket path in the page: {ws_path}")
    expect('data-username="alice@example.com"' in html, "page username is not get_username()")
    script = alice.get(f"{PREFIX}/static/chat/chat.js")
    expect(script.status_code == 200, f"chat.js: {script.status_code}")
    css = alice.get(f"{PREFIX}/static/chat/chat.css").text
    # Host elements styled by a rule of their own (not under .rtk-chat): what issue 13 saw.
    global_rule = re.search(r"^\s*(html|body|header|main|nav|:root)\b[^{]*\{", css, re.M)
    expect(global_rule is None, f"chat.css styles the host's page: {global_rule}")
    expect(alice.get(f"{PREFIX}/chat/assistant/").status_code == 200, "assistant page")
    seen["ws_path"] = ws_path
    return ws_path


async def chat_smoke(base_url: str, alice: httpx.Client, bob: httpx.Client) -> None:
    ws_path = check_pages(base_url, alice)
    a = await open_socket(base_url, alice, ws_path)
    hello = await a.wait(lambda f: f["type"] == "hello", "hello")
    expect(hello["user"]["username"] == "alice@example.com", f"hello: {hello}")
    b = await open_socket(base_url, bob, ws_path)
    await b.wait(lambda f: f["type"] == "hello", "hello of bob")

    def bob_present(frame: dict[str, Any]) -> bool:
        users = frame.get("users", []) + frame.get("joins", [])
        return frame["type"].startswith("presence") and any(
            u["username"] == "bob@example.com" for u in users
        )

    await a.wait(bob_present, "presence of bob")
    seen["presence"] = True
    text = "hello @bob@example.com"
    await a.ws.send(json.dumps({"type": "message", "text": text, "client_id": "smoke-1"}))
    await a.wait(lambda f: f["type"] == "ack" and f["client_id"] == "smoke-1", "ack")
    message = await b.wait(lambda f: f["type"] == "message" and f["text"] == text, "message")
    expect(message["user"]["username"] == "alice@example.com", f"author: {message['user']}")
    seen["message_seq"] = message["seq"]
    await a.ws.send(json.dumps({"type": "message", "text": "@assistant hi", "client_id": "s-2"}))
    end = await b.wait(lambda f: f["type"] == "assistant.end", "assistant.end")
    expect(end["status"] == "done", f"assistant reply: {end}")
    reply = await b.wait(
        lambda f: f["type"] == "message" and f["seq"] == end["seq"], "the stored reply"
    )
    seen["assistant"] = reply["user"]["username"]
    await a.ws.close()
    await b.ws.close()
    export = alice.get(f"{PREFIX}/chat/lobby/export/", params={"format": "ndjson"})
    expect(export.status_code == 200, f"export: {export.status_code}")
    rows = [json.loads(line) for line in export.text.splitlines() if line]
    expect(any(r["text"] == text for r in rows), "the message is not in the export")
    seen["export_rows"] = len(rows)


async def notifications_smoke(base_url: str, bob: httpx.Client, mention: bool) -> None:
    from notifications.testing import open_stream

    cookies = dict(bob.cookies.items())
    async with (
        httpx.AsyncClient(base_url=base_url, cookies=cookies, timeout=30) as client,
        open_stream(client, f"{PREFIX}/notifications/stream/") as stream,
    ):
        if mention:
            # Mentioned by alice in the chat smoke, before the stream opened: counted.
            unread = await stream.unread(seconds=WAIT_SECONDS)
            expect(unread["count"] == 1, f"unread after the mention: {unread}")
        from notifications import anotify

        bob_user = await get_user_model().objects.aget(email="bob@example.com")
        # Stored by this process: the server's stream finds it by its database poll.
        await anotify(bob_user, "Welcome to the community")
        live = await stream.wait_event(
            lambda e: e.event == "notification" and "Welcome" in e.data,
            seconds=WAIT_SECONDS,
            what="the live notification",
        )
        seen["sse"] = json.loads(live.data)["title"]
    listing = bob.get(f"{PREFIX}/notifications/")
    expect(listing.status_code == 200, f"notification list: {listing.status_code}")
    titles = [n["title"] for n in listing.json()["notifications"]]
    if mention:
        seen["mention"] = titles[-1]
    expect(titles[0] == seen["sse"], f"notification list: {titles}")


def admin_smoke(base_url: str) -> None:
    admin = login(base_url, "admin@example.com")
    pages = ["accounts/user/"]
    if HAS_CHAT:
        pages += ["chat/room/", "chat/message/", "chat/membership/", "chat/readmarker/"]
    if HAS_NOTIFICATIONS:
        pages += ["notifications/notification/", "notifications/notification/send/"]
    statuses = {}
    for page in pages:
        # A search through the user relation: a 500 FieldError without USERNAME_FIELD.
        response = admin.get(f"{PREFIX}/admin/{page}", params={"q": "alice"})
        statuses[page] = response.status_code
    expect(set(statuses.values()) == {200}, f"admin pages: {statuses}")
    if HAS_CHAT:
        alice = get_user_model().objects.get(email="alice@example.com")
        delete = admin.get(f"{PREFIX}/admin/accounts/user/{alice.pk}/delete/")
        expect(delete.status_code == 200, f"delete page of a writer: {delete.status_code}")
        seen["writer_delete_page_protected"] = "protected" in delete.text.lower()
    seen["admin"] = statuses


def main() -> None:
    from realtime_kit.testing import live_server

    prepare()
    env = {"COMMUNITY_DB": os.environ["COMMUNITY_DB"]}
    application = "community_site.asgi:application"
    with live_server(application, env=env, health_path=f"{PREFIX}/healthz") as server:
        base_url = server.base_url
        expect(httpx.get(base_url + f"{PREFIX}/").status_code == 200, "home page")
        alice, bob = login(base_url, "alice@example.com"), login(base_url, "bob@example.com")
        try:
            if HAS_CHAT:
                asyncio.run(chat_smoke(base_url, alice, bob))
            if HAS_NOTIFICATIONS:
                asyncio.run(notifications_smoke(base_url, bob, mention=HAS_CHAT))
            admin_smoke(base_url)
        except BaseException:
            print(server.log()[-4000:], file=sys.stderr)
            raise
    print("SMOKE " + json.dumps(seen, sort_keys=True))


if __name__ == "__main__":
    main()
