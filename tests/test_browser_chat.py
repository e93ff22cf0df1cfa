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
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Dialog,
    Error,
    Page,
    expect,
    sync_playwright,
)

from tests.servers import TEST_PASSWORD, DaphneServer, require_binary

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    # The closed network makes Chromium stall on these outbound lookups.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
FAST_CLIENT = {
    "pingIntervalMs": 1000,
    "pongTimeoutMs": 2000,
    "backoffBaseMs": 100,
    "backoffCapMs": 1000,
    "connectTimeoutMs": 3000,
    "retryMs": 500,
}
WAIT_MS = 20_000
MESSAGES = "[data-testid=messages]"
CONFIRMED_TEXTS = f"{MESSAGES} li[data-seq] .text"
UNCONFIRMED = f"{MESSAGES} li[data-client-id]"
USER_ID_JS = "el => el.closest('#chat-room').dataset.userId"


@pytest.fixture
def browser() -> Iterator[Browser]:
    executable = require_binary("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page_errors() -> Iterator[list[str]]:
    """Uncaught JavaScript errors of every page: a test fails if chat.js threw anything."""
    errors: list[str] = []
    yield errors
    assert errors == []


def new_context(browser: Browser, page_errors: list[str]) -> BrowserContext:
    def watch(page: Page) -> None:
        def record(error: Error) -> None:
            page_errors.append(f"{page.url}: {error.message}")

        page.on("pageerror", record)

    context = browser.new_context()
    context.on("page", watch)
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(f"window.CHAT_CONFIG = {json.dumps(FAST_CLIENT)};")
    return context


def open_room(context: BrowserContext, server: DaphneServer, username: str) -> Page:
    """Log in through the login form the room redirects to; wait until the socket is up."""
    page = context.new_page()
    page.goto(f"{server.base_url}/chat/lobby/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", TEST_PASSWORD)
    page.click("form[action='/accounts/login/'] button[type=submit]")
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
