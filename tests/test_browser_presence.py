"""Presence in headless Chromium: two users see each other come online, type, read and leave."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from tests.servers import DaphneServer
from tests.test_browser_chat import new_context, open_room, send

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def member(page: Page, username: str) -> Locator:
    return page.locator("[data-testid=members] li").filter(has_text=re.compile(f"^{username}"))


def test_two_users_see_presence_typing_reads_and_leaving(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, tmp_path: Path
) -> None:
    alice_ctx = new_context(browser, page_errors)
    bob_ctx = new_context(browser, page_errors)
    alice = open_room(alice_ctx, daphne, "alice")
    expect(member(alice, "alice")).to_have_attribute("data-online", "true")

    bob = open_room(bob_ctx, daphne, "bob")
    # Each sees the other online.
    expect(member(alice, "bob")).to_have_attribute("data-online", "true")
    expect(member(bob, "alice")).to_have_attribute("data-online", "true")

    # Bob types: alice sees the indicator, bob does not see his own.
    bob.get_by_test_id("text").press_sequentially("hel")
    expect(alice.get_by_test_id("typing")).to_have_text("bob is typing…")
    expect(bob.get_by_test_id("typing")).to_be_hidden()
    # Sending the message clears the indicator.
    bob.get_by_test_id("text").fill("hello alice")
    bob.get_by_test_id("send").click()
    expect(alice.locator("[data-testid=messages] li[data-seq] .text")).to_have_text(["hello alice"])
    expect(alice.get_by_test_id("typing")).to_be_hidden()

    # Alice's visible page reads it: bob sees "Seen by alice".
    expect(bob.get_by_test_id("seen-by")).to_have_text("Seen by alice")
    send(alice, "hi bob")
    expect(alice.get_by_test_id("seen-by")).to_have_text("Seen by bob")

    # An indicator without refreshes expires on its own, even if "stopped" never comes (sent
    # by hand here, so bob's page does not follow up with active: false).
    bob.evaluate("window.chatClient.sendFrame({type: 'typing', active: true})")
    expect(alice.get_by_test_id("typing")).to_have_text("bob is typing…")
    expect(alice.get_by_test_id("seen-by")).to_have_text("Seen by bob")
    alice.screenshot(path=tmp_path / "chat-presence.png")
    expect(alice.get_by_test_id("typing")).to_be_hidden(timeout=12_000)

    # Bob leaves: alice sees him go offline, still listed as a member who read the room.
    bob_ctx.close()
    expect(member(alice, "bob")).to_have_attribute("data-online", "false")

    # The room list shows an unread badge for messages alice has not seen.
    room_list = alice_ctx.new_page()
    room_list.goto(f"{daphne.base_url}/chat/")
    expect(room_list.locator("[data-room=lobby] [data-testid=unread]")).to_have_count(0)
    alice.close()
    other = open_room(new_context(browser, page_errors), daphne, "bob")
    send(other, "are you there?")
    expect(other.locator("[data-testid=messages] li[data-seq]")).to_have_count(3)
    room_list.reload()
    expect(room_list.locator("[data-room=lobby] [data-testid=unread]")).to_have_text("1")
    room_list.screenshot(path=tmp_path / "chat-rooms.png")
    alice_ctx.close()
