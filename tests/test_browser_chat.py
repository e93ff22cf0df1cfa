"""The chat page in headless Chromium against a real daphne: delivery across a server crash.

chat.js reads short heartbeat and backoff settings from ``window.CHAT_CONFIG`` (set by an init
script before the page's own scripts run), so a killed server is noticed within a second or two.
Every wait is a Playwright ``expect`` with a generous timeout; nothing asserts on timing.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Dialog,
    Page,
    WebSocketRoute,
    expect,
)

from tests.browsers import submit_login, watched_context
from tests.servers import DaphneServer

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

FAST_CLIENT = {
    "pingIntervalMs": 1000,
    "pongTimeoutMs": 2000,
    "backoffBaseMs": 100,
    "backoffCapMs": 1000,
    "connectTimeoutMs": 3000,
    "retryMs": 500,
}
MESSAGES = "[data-testid=messages]"
CONFIRMED_TEXTS = f"{MESSAGES} li[data-seq] .text"
UNCONFIRMED = f"{MESSAGES} li[data-client-id]"
USER_ID_JS = "el => el.closest('#chat-room').dataset.userId"
# Logs the seq of every message element as it is inserted: the order things were rendered in,
# which the final DOM alone cannot show (a message rendered early, then moved, looks fine).
RECORD_RENDER_ORDER_JS = """
window.renderedSeqs = [];
new MutationObserver((mutations) => {
  for (const m of mutations) for (const node of m.addedNodes) {
    if (node.nodeName === "LI" && node.dataset.seq) {
      window.renderedSeqs.push(Number(node.dataset.seq));
    }
  }
}).observe(document, {childList: true, subtree: true});
"""


def new_context(
    browser: Browser, page_errors: list[str], timezone_id: str | None = None
) -> BrowserContext:
    return watched_context(
        browser,
        page_errors,
        f"window.CHAT_CONFIG = {json.dumps(FAST_CLIENT)};",
        RECORD_RENDER_ORDER_JS,
        timezone_id=timezone_id,
    )


def open_room(context: BrowserContext, server: DaphneServer, username: str) -> Page:
    """Log in through the login form the room redirects to; wait until the socket is up."""
    page = context.new_page()
    page.goto(f"{server.base_url}/chat/lobby/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    submit_login(page, username)
    expect(page).to_have_url(re.compile(r"/chat/lobby/$"))
    expect_state(page, "connected")
    return page


def expect_state(page: Page, state: str | re.Pattern[str]) -> None:
    expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", state)


def send(page: Page, text: str) -> None:
    page.get_by_test_id("text").fill(text)
    page.get_by_test_id("send").click()


def confirmed_texts(page: Page) -> list[str]:
    return page.locator(CONFIRMED_TEXTS).all_text_contents()


def shown_seqs(page: Page) -> list[int]:
    seqs = page.locator(f"{MESSAGES} li[data-seq]").evaluate_all(
        "items => items.map(li => Number(li.dataset.seq))"
    )
    return [int(s) for s in seqs]


def rendered_seqs(page: Page) -> list[int]:
    return [int(seq) for seq in page.evaluate("window.renderedSeqs")]


def outbox_length(page: Page) -> int:
    return int(page.evaluate("window.chatClient.outboxLength"))


def stored_texts(env: dict[str, str], room: str = "lobby") -> list[str]:
    """Texts of the room's messages in seq order, read by a fresh connection to the database."""
    conn = sqlite3.connect(f"file:{env['SQLITE_PATH']}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT m.text FROM chat_message m JOIN chat_room r ON r.id = m.room_id "
            "WHERE r.slug = ? ORDER BY m.seq",
            (room,),
        ).fetchall()
    finally:
        conn.close()
    return [text for (text,) in rows]


def stored_client_ids(env: dict[str, str], text: str) -> list[str]:
    conn = sqlite3.connect(f"file:{env['SQLITE_PATH']}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT client_id FROM chat_message WHERE text = ?", (text,)).fetchall()
    finally:
        conn.close()
    return [client_id for (client_id,) in rows]


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """Screenshots go to CHAT_SCREENSHOT_DIR when set (to look at them), else the test's tmp."""
    return Path(os.environ.get("CHAT_SCREENSHOT_DIR") or tmp_path) / name


def test_messages_typed_while_server_is_down_arrive_once_after_restart(
    browser: Browser,
    page_errors: list[str],
    daphne: DaphneServer,
    sqlite_env: dict[str, str],
    tmp_path: Path,
) -> None:
    alice = open_room(new_context(browser, page_errors), daphne, "alice")
    bob = open_room(new_context(browser, page_errors), daphne, "bob")

    # Live exchange: each waits to see the previous message, so the order is known.
    online = ["hello from alice", "hi alice, bob here", "alice again"]
    for page, text, done in [(alice, online[0], 1), (bob, online[1], 2), (alice, online[2], 3)]:
        send(page, text)
        for viewer in (alice, bob):
            expect(viewer.locator(CONFIRMED_TEXTS)).to_have_text(online[:done])

    daphne.kill()
    for page in (alice, bob):
        expect_state(page, re.compile(r"^(reconnecting|offline)$"))

    typed_offline = {alice: ["alice offline 1", "alice offline 2"], bob: ["bob offline 1"]}
    for page, texts in typed_offline.items():
        for text in texts:
            send(page, text)
        expect(page.locator(f"{UNCONFIRMED}.pending .text")).to_have_text(texts)
        assert outbox_length(page) == len(texts)
    expect(alice.locator(CONFIRMED_TEXTS)).to_have_text(online)
    alice.screenshot(path=screenshot_path(tmp_path, "chat-room-offline.png"))

    daphne.restart()

    total = len(online) + sum(len(texts) for texts in typed_offline.values())
    for page in (alice, bob):
        expect_state(page, "connected")
        expect(page.locator(CONFIRMED_TEXTS)).to_have_count(total)
        expect(page.locator(UNCONFIRMED)).to_have_count(0)
        assert outbox_length(page) == 0

    shown = confirmed_texts(alice)
    assert confirmed_texts(bob) == shown
    assert shown[: len(online)] == online
    assert sorted(shown[len(online) :]) == sorted(
        t for texts in typed_offline.values() for t in texts
    )
    for texts in typed_offline.values():
        # Each sender's own messages keep the order they were typed in.
        assert [t for t in shown if t in texts] == texts
    assert shown_seqs(alice) == shown_seqs(bob) == list(range(1, total + 1))
    assert rendered_seqs(alice) == rendered_seqs(bob) == list(range(1, total + 1))
    assert stored_texts(sqlite_env) == shown

    alice.screenshot(path=screenshot_path(tmp_path, "chat-room.png"))


def test_outbox_survives_closing_the_page_and_is_resent_once(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    context = new_context(browser, page_errors)
    page = open_room(context, daphne, "alice")
    send(page, "before the crash")
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text(["before the crash"])

    daphne.kill()
    expect_state(page, re.compile(r"^(reconnecting|offline)$"))
    send(page, "typed, then the tab was closed")
    expect(page.locator(f"{UNCONFIRMED}.pending")).to_have_count(1)
    page.close()

    daphne.restart()
    page = context.new_page()
    page.goto(f"{daphne.base_url}/chat/lobby/")
    expected = ["before the crash", "typed, then the tab was closed"]
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text(expected)
    expect(page.locator(UNCONFIRMED)).to_have_count(0)
    assert outbox_length(page) == 0

    # An ack lost in a crash leaves a stored message in the outbox: put one back by hand.
    # The resend carries the same client_id, so the server acks it without storing it again.
    (client_id,) = stored_client_ids(sqlite_env, "before the crash")
    page.evaluate(
        """([key, item]) => localStorage.setItem(key, JSON.stringify([item]))""",
        [
            f"chat:outbox:lobby:{page.get_by_test_id('composer').evaluate(USER_ID_JS)}",
            {"client_id": client_id, "text": "before the crash", "created_at": "2026-01-01T00:00Z"},
        ],
    )
    page.reload()
    expect_state(page, "connected")
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text(expected)
    expect(page.locator(UNCONFIRMED)).to_have_count(0)
    assert outbox_length(page) == 0
    assert stored_texts(sqlite_env) == expected


def test_message_text_is_rendered_as_text_not_html(
    browser: Browser, page_errors: list[str], daphne: DaphneServer
) -> None:
    alice = open_room(new_context(browser, page_errors), daphne, "alice")
    bob = open_room(new_context(browser, page_errors), daphne, "bob")
    dialogs: list[str] = []

    def record(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    for page in (alice, bob):
        page.on("dialog", record)

    texts = ["<img src=x onerror=alert(1)>", "<b>not bold</b> & <script>alert(2)</script>"]
    for text in texts:
        send(alice, text)
    for page in (alice, bob):
        expect(page.locator(CONFIRMED_TEXTS)).to_have_text(texts)
        assert page.locator(f"{MESSAGES} img, {MESSAGES} b, {MESSAGES} script").count() == 0
    # A fresh page renders the same text from history.
    bob.reload()
    expect(bob.locator(CONFIRMED_TEXTS)).to_have_text(texts)
    assert bob.locator(f"{MESSAGES} img").count() == 0
    assert dialogs == []


# --- protocol corner cases against a scripted server ----------------------------------------
#
# The real server never sends a gap, a duplicate or a shrunken last_seq, so these tests let the
# page load from daphne but answer its WebSocket with FakeChatServer (Playwright's
# route_web_socket): it behaves like chat/consumers.py unless a test tells it to misbehave.


class FakeChatServer:
    """Server side of /ws/chat/ for every page of one browser context, scripted by a test."""

    def __init__(self, context: BrowserContext, user: dict[str, Any]) -> None:
        self.user = user
        self.store: dict[int, dict[str, Any]] = {}  # seq -> message frame: "the database"
        self.sockets: list[WebSocketRoute] = []
        self.received: list[dict[str, Any]] = []
        self.muted: set[int] = set()  # indexes of sockets whose pings go unanswered
        self.refuse: dict[str, list[str]] = {}  # text -> error codes to answer, in turn
        self.close_on_connect: int | None = None
        context.route_web_socket(re.compile(r"/ws/chat/lobby/"), self._connect)

    @property
    def last_seq(self) -> int:
        return max(self.store, default=0)

    def message(self, seq: int, text: str, client_id: str | None = None) -> dict[str, Any]:
        user = self.user if client_id else {"id": 999, "username": "carol"}
        return {
            "type": "message",
            "seq": seq,
            "id": seq,
            "room": "lobby",
            "user": user,
            "text": text,
            "client_id": client_id,
            "created_at": "2026-01-01T12:00:00+00:00",
        }

    def add(self, seq: int, text: str) -> dict[str, Any]:
        self.store[seq] = frame = self.message(seq, text)
        return frame

    def send(self, *frames: dict[str, Any], socket: int = -1) -> None:
        """Send frames as one WebSocket message (an array when there are several)."""
        self.sockets[socket].send(json.dumps(frames[0] if len(frames) == 1 else list(frames)))

    def frames_of_type(self, frame_type: str) -> list[dict[str, Any]]:
        return [f for f in self.received if f.get("type") == frame_type]

    def _connect(self, ws: WebSocketRoute) -> None:
        index = len(self.sockets)
        self.sockets.append(ws)
        if self.close_on_connect is not None:
            ws.close(code=self.close_on_connect, reason="refused")
            return
        ws.on_message(lambda raw: self._receive(index, raw))
        hello = {"type": "hello", "room": "lobby", "user": self.user, "last_seq": self.last_seq}
        self.send(hello, socket=index)
        after = parse_qs(urlsplit(ws.url).query).get("after")
        seqs = sorted(self.store)
        history = [s for s in seqs if s > int(after[0])] if after else seqs[-50:]
        if history:
            self.send(*(self.store[s] for s in history), socket=index)

    def _receive(self, index: int, raw: str | bytes) -> None:
        decoded = json.loads(raw)
        for frame in decoded if isinstance(decoded, list) else [decoded]:
            self.received.append(frame)
            if frame["type"] == "ping" and index not in self.muted:
                self.send({"type": "pong"}, socket=index)
            elif frame["type"] == "resume":
                replay = [self.store[s] for s in sorted(self.store) if s > frame["after"]]
                if replay:
                    self.send(*replay, socket=index)
            elif frame["type"] == "message":
                self._store_message(index, frame)

    def _store_message(self, index: int, frame: dict[str, Any]) -> None:
        cid, text = frame["client_id"], frame["text"]
        if self.refuse.get(text):
            code = self.refuse[text].pop(0)
            error = {"type": "error", "code": code, "message": f"refused: {code}"}
            self.send({**error, "client_id": cid}, socket=index)
            return
        for stored in self.store.values():
            if stored["client_id"] == cid:  # idempotent, like services.post_message
                self.send({"type": "ack", "client_id": cid, "seq": stored["seq"]}, socket=index)
                return
        seq = self.last_seq + 1
        self.store[seq] = self.message(seq, text, client_id=cid)
        self.send({"type": "ack", "client_id": cid, "seq": seq}, socket=index)
        self.send(self.store[seq], socket=index)


@pytest.fixture
def fake_room(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> Callable[..., tuple[Page, FakeChatServer]]:
    """Factory: a fake server with ``seed`` messages, and alice's lobby page connected to it."""

    def open_fake(
        seed: int = 3, config: dict[str, int] | None = None
    ) -> tuple[Page, FakeChatServer]:
        context = new_context(browser, page_errors)
        if config:
            context.add_init_script(f"Object.assign(window.CHAT_CONFIG, {json.dumps(config)});")
        fake = FakeChatServer(context, {"id": user_id(sqlite_env, "alice"), "username": "alice"})
        for seq in range(1, seed + 1):
            fake.add(seq, f"message {seq}")
        page = open_room(context, daphne, "alice")
        expect(page.locator(CONFIRMED_TEXTS)).to_have_count(seed)
        return page, fake

    return open_fake


def user_id(env: dict[str, str], username: str) -> int:
    conn = sqlite3.connect(f"file:{env['SQLITE_PATH']}?mode=ro", uri=True)
    try:
        (row,) = conn.execute("SELECT id FROM auth_user WHERE username = ?", (username,))
    finally:
        conn.close()
    return int(row[0])


def texts(first: int, last: int) -> list[str]:
    return [f"message {seq}" for seq in range(first, last + 1)]


def test_a_gap_is_replayed_before_anything_after_it_is_rendered(
    fake_room: Callable[..., tuple[Page, FakeChatServer]],
) -> None:
    page, fake = fake_room(seed=3)
    fake.add(4, "message 4")
    fake.send(fake.add(5, "message 5"))  # live 5 overtakes 4
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text(texts(1, 5))
    assert fake.frames_of_type("resume") == [{"type": "resume", "after": 3, "after_update": 0}]
    assert rendered_seqs(page) == [1, 2, 3, 4, 5]

    # Duplicates (a replay overlapping live frames) are dropped.
    fake.send(fake.store[4], fake.store[5])
    fake.send(fake.add(6, "message 6"))
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text(texts(1, 6))
    assert rendered_seqs(page) == [1, 2, 3, 4, 5, 6]


def test_a_seq_missing_from_the_replay_is_skipped_not_awaited_forever(
    fake_room: Callable[..., tuple[Page, FakeChatServer]],
) -> None:
    page, fake = fake_room(seed=3)
    fake.add(5, "message 5")  # seq 4 was deleted
    fake.send(fake.add(6, "message 6"))
    expected = [*texts(1, 3), "message 5", "message 6"]
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text(expected)
    fake.send(fake.add(7, "message 7"))
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text([*expected, "message 7"])
    assert rendered_seqs(page) == [1, 2, 3, 5, 6, 7]


def test_reconnect_resumes_after_the_last_seq_and_reloads_after_a_database_reset(
    fake_room: Callable[..., tuple[Page, FakeChatServer]],
) -> None:
    page, fake = fake_room(seed=5)
    fake.sockets[-1].close(code=1012, reason="restart")
    fake.add(6, "message 6")
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text(texts(1, 6))
    assert len(fake.sockets) == 2
    assert fake.sockets[1].url.endswith("/ws/chat/lobby/?after=5&after_update=0")

    # The database was reset: the server's last_seq (2) is below what the page has shown (6).
    fake.store.clear()
    fake.add(1, "new 1")
    fake.add(2, "new 2")
    fake.sockets[-1].close(code=1012, reason="restart")
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text(["new 1", "new 2"])
    assert fake.sockets[-1].url.endswith("?after=6&after_update=0")
    assert fake.frames_of_type("resume")[-1] == {"type": "resume", "after": 0, "after_update": 0}
    expect(page.get_by_test_id("notice")).to_contain_text("reset")


def test_a_silent_connection_is_dropped_and_replaced(
    fake_room: Callable[..., tuple[Page, FakeChatServer]],
) -> None:
    page, fake = fake_room(seed=2)
    fake.muted.add(0)  # the first socket stops answering pings: a half-open connection
    page.wait_for_function("window.chatClient.sessions >= 2")
    expect_state(page, "connected")
    assert fake.sockets[1].url.endswith("?after=2&after_update=0")
    send(page, "after the reconnect")
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text([*texts(1, 2), "after the reconnect"])


def test_refused_messages_are_retried_or_marked_failed(
    fake_room: Callable[..., tuple[Page, FakeChatServer]], tmp_path: Path
) -> None:
    page, fake = fake_room(seed=1)
    fake.refuse = {"slow down": ["rate_limited", "unavailable"], "too long": ["too_long"]}
    send(page, "slow down")
    send(page, "too long")
    failed = page.locator(f"{UNCONFIRMED}.failed")
    expect(failed.locator(".text")).to_have_text(["too long"])
    expect(failed).to_contain_text("not sent")
    expect(page.locator(CONFIRMED_TEXTS)).to_have_text(["message 1", "slow down"])
    attempts = [f for f in fake.frames_of_type("message") if f["text"] == "slow down"]
    assert len(attempts) == 3
    assert len({f["client_id"] for f in attempts}) == 1
    assert len([f for f in fake.frames_of_type("message") if f["text"] == "too long"]) == 1
    assert outbox_length(page) == 0
    page.screenshot(path=screenshot_path(tmp_path, "chat-room-failed.png"))
    failed.get_by_role("button", name="dismiss").click()
    expect(page.locator(UNCONFIRMED)).to_have_count(0)


def test_refusal_close_codes_stop_reconnecting(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    context = new_context(browser, page_errors)
    fake = FakeChatServer(context, {"id": user_id(sqlite_env, "alice"), "username": "alice"})
    fake.close_on_connect = 4404
    page = context.new_page()
    page.goto(f"{daphne.base_url}/accounts/login/?next=/chat/lobby/")
    submit_login(page, "alice")
    expect_state(page, "offline")
    expect(page.get_by_test_id("notice")).to_contain_text("does not exist")
    expect(page.get_by_test_id("send")).to_be_disabled()
    # A negative check needs some time to pass: several times the largest backoff.
    page.wait_for_timeout(4 * FAST_CLIENT["backoffCapMs"])
    assert len(fake.sockets) == 1


def test_the_outbox_is_not_sent_as_another_user(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    context = new_context(browser, page_errors)
    # Another tab logged in as bob since this page was rendered for alice.
    fake = FakeChatServer(context, {"id": user_id(sqlite_env, "bob"), "username": "bob"})
    alice_id = user_id(sqlite_env, "alice")
    item = {"client_id": "cid-1", "text": "alice's draft", "created_at": "2026-01-01T00:00Z"}
    context.add_init_script(
        f"if (location.pathname === '/chat/lobby/') localStorage.setItem("
        f"'chat:outbox:lobby:{alice_id}', {json.dumps(json.dumps([item]))});"
    )
    page = context.new_page()
    page.goto(f"{daphne.base_url}/accounts/login/?next=/chat/lobby/")
    submit_login(page, "alice")
    expect_state(page, "offline")
    expect(page.get_by_test_id("notice")).to_contain_text("logged in as bob")
    expect(page.locator(f"{UNCONFIRMED}.pending .text")).to_have_text(["alice's draft"])
    assert fake.frames_of_type("message") == []
    assert outbox_length(page) == 1


def test_online_and_visible_events_reconnect_at_once(
    fake_room: Callable[..., tuple[Page, FakeChatServer]],
) -> None:
    # Backoff long enough that only the events can explain a prompt reconnect.
    page, fake = fake_room(seed=1, config={"backoffBaseMs": 600_000, "backoffCapMs": 600_000})
    for event in ("new Event('online')", "new Event('visibilitychange')"):
        sockets = len(fake.sockets)
        fake.sockets[-1].close(code=1012, reason="restart")
        expect_state(page, "reconnecting")
        target = "document" if "visibility" in event else "window"
        page.evaluate(f"{target}.dispatchEvent({event})")
        expect_state(page, "connected")
        assert len(fake.sockets) == sockets + 1
        assert fake.sockets[-1].url.endswith("?after=1&after_update=0")
