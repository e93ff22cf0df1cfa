"""Editing and deleting in Chromium against a real daphne: two users see each change live, and
after a reconnect a user who was away sees the changes made meanwhile, once each."""

from __future__ import annotations

import re
import textwrap

import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, WebSocketRoute, expect

from tests.servers import DaphneServer, run_django_script, seed_messages
from tests.test_browser_chat import (
    CONFIRMED_TEXTS,
    MESSAGES,
    expect_state,
    new_context,
    open_room,
    rendered_seqs,
    send,
    shown_seqs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def message(page: Page, seq: int) -> Locator:
    return page.locator(f"{MESSAGES} li[data-seq='{seq}']")


def edit(page: Page, seq: int, text: str) -> None:
    item = message(page, seq)
    item.locator("button.edit").click()
    box = item.locator("textarea.edit-text")
    box.fill(text)
    box.press("Enter")


def delete(page: Page, seq: int) -> None:
    button = message(page, seq).locator("button.delete")
    button.click()
    expect(button).to_have_text("really delete?")
    button.click()


class Gate:
    """Passes one context's chat WebSockets through to daphne until told to cut them."""

    def __init__(self, context: BrowserContext) -> None:
        self.blocked = False
        self.open: list[tuple[WebSocketRoute, WebSocketRoute]] = []
        self.urls: list[str] = []
        context.route_web_socket(re.compile(r"/ws/chat/"), self._connect)

    def _connect(self, ws: WebSocketRoute) -> None:
        self.urls.append(ws.url)
        if self.blocked:
            ws.close(code=1013, reason="away")  # transient: the page keeps retrying
            return
        self.open.append((ws, ws.connect_to_server()))

    def cut(self) -> None:
        """Drop every open socket and refuse new ones (the user is away)."""
        self.blocked = True
        for page_side, server_side in self.open:
            server_side.close()
            page_side.close(code=1013, reason="away")
        self.open.clear()

    def reopen(self) -> None:
        self.blocked = False


def test_two_users_see_edits_and_deletes_live_and_after_a_reconnect(
    browser: Browser, page_errors: list[str], daphne: DaphneServer
) -> None:
    alice = open_room(new_context(browser, page_errors), daphne, "alice")
    bob_context = new_context(browser, page_errors)
    gate = Gate(bob_context)
    bob = open_room(bob_context, daphne, "bob")
    for text in ("helo", "second", "third"):
        send(alice, text)
        for page in (alice, bob):
            expect(page.locator(CONFIRMED_TEXTS).last).to_have_text(text)

    # Only the author gets the controls.
    expect(message(alice, 1).locator("button.edit")).to_have_count(1)
    expect(message(bob, 1).locator("button.edit")).to_have_count(0)

    # Escape cancels an edit: nothing is sent, the text stays.
    item = message(alice, 1)
    item.locator("button.edit").click()
    item.locator("textarea.edit-text").fill("not this")
    item.locator("textarea.edit-text").press("Escape")
    expect(item.locator("textarea.edit-text")).to_have_count(0)
    expect(item.locator(".text")).to_have_text("helo")

    # Live: both see the edit (with its mark) and the delete (a placeholder, seq kept).
    edit(alice, 1, "hello")
    delete(alice, 2)
    for page in (alice, bob):
        first = message(page, 1)
        expect(first.locator(".text")).to_have_text("hello")
        expect(first.locator(".edited")).to_have_text("(edited)")
        second = message(page, 2)
        expect(second).to_have_class(re.compile(r"\bdeleted\b"))
        expect(second.locator(".text")).to_have_text("message deleted")
    expect(message(alice, 2).locator("button.delete")).to_have_count(0)

    # Bob goes away; meanwhile alice edits and deletes what he has, and posts and edits more.
    gate.cut()
    expect_state(bob, re.compile(r"^(reconnecting|offline)$"))
    edit(alice, 1, "hello again")
    delete(alice, 3)
    send(alice, "fourth")
    expect(alice.locator(CONFIRMED_TEXTS).last).to_have_text("fourth")
    edit(alice, 4, "fourth, edited")
    expect(alice.locator(CONFIRMED_TEXTS).last).to_have_text("fourth, edited")

    gate.reopen()
    expect_state(bob, "connected")
    expect(bob.locator(CONFIRMED_TEXTS)).to_have_text(
        ["hello again", "message deleted", "message deleted", "fourth, edited"]
    )
    expect(message(bob, 4).locator(".edited")).to_have_text("(edited)")
    assert "after_update=" in gate.urls[-1]
    # Each message rendered once, in order, across the reconnect; the changes applied once.
    assert shown_seqs(bob) == rendered_seqs(bob) == [1, 2, 3, 4]
    # The next pong tells it every change up to 5 reached it (4 came as a current text).
    bob.wait_for_function("window.chatClient.lastUpdateSeq === 5")
    assert shown_seqs(alice) == [1, 2, 3, 4]


_CHANGE_OLD_MESSAGES = textwrap.dedent(
    """
    import django
    django.setup()
    from chat import services
    from chat.models import Message

    old = Message.objects.filter(room__slug="lobby").order_by("seq")
    services.staff_edit_message(old[0].pk, "first, edited")
    services.staff_delete_message(old[1].pk)
    """
)


def test_older_pages_show_edits_and_deletes(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    seed_messages(sqlite_env, "lobby", 60)
    run_django_script(_CHANGE_OLD_MESSAGES, sqlite_env)
    page = open_room(new_context(browser, page_errors), daphne, "bob")
    expect(page.locator(f"{MESSAGES} li[data-seq]")).to_have_count(50)
    page.get_by_test_id("load-older").click()
    expect(page.locator(f"{MESSAGES} li[data-seq]")).to_have_count(60)
    expect(message(page, 1).locator(".text")).to_have_text("first, edited")
    expect(message(page, 1).locator(".edited")).to_have_text("(edited)")
    expect(message(page, 2)).to_have_class(re.compile(r"\bdeleted\b"))
    expect(message(page, 2).locator(".text")).to_have_text("message deleted")
    expect(message(page, 3).locator(".edited")).to_have_count(0)
