"""Rooms in headless Chromium: alice creates a private room and invites bob, whose open room
list shows it without a reload; alice's message raises bob's unread badge and tab title live;
removing bob closes his open room page."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.browsers import submit_login
from tests.servers import DaphneServer
from tests.test_browser_chat import expect_state, new_context, send

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def open_room_list(context: BrowserContext, server: DaphneServer, username: str) -> Page:
    page = context.new_page()
    page.goto(f"{server.base_url}/chat/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    submit_login(page, username)
    expect(page).to_have_url(re.compile(r"/chat/$"))
    return page


def test_create_invite_and_live_unread(
    browser: Browser,
    page_errors: list[str],
    start_daphne: Callable[..., DaphneServer],
    sqlite_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # The room list polls every second here (10 s by default).
    server = start_daphne({**sqlite_env, "CHAT_ROOM_LIST_POLL_SECONDS": "1"})
    alice_ctx = new_context(browser, page_errors)
    bob_ctx = new_context(browser, page_errors)
    bob = open_room_list(bob_ctx, server, "bob")
    expect(bob.locator("[data-room=team-plans]")).to_have_count(0)

    # Alice creates a private room from the list; the slug is suggested from the title.
    alice = open_room_list(alice_ctx, server, "alice")
    alice.get_by_test_id("new-room-title").fill("Team Plans")
    expect(alice.get_by_test_id("new-room-slug")).to_have_value("team-plans")
    alice.get_by_test_id("new-room-private").check()
    alice.get_by_test_id("new-room-create").click()
    expect(alice).to_have_url(re.compile(r"/chat/team-plans/$"))
    expect_state(alice, "connected")

    # A taken slug is refused with the server's message.
    other = alice_ctx.new_page()
    other.goto(f"{server.base_url}/chat/")
    other.get_by_test_id("new-room-title").fill("Team Plans")
    other.get_by_test_id("new-room-create").click()
    expect(other.get_by_test_id("new-room-error")).to_have_text("A room with this slug exists.")
    other.close()

    # Bob cannot open it yet: the page says it is private and who owns it.
    outsider = bob_ctx.new_page()
    response = outsider.goto(f"{server.base_url}/chat/team-plans/")
    assert response is not None and response.status == 403
    expect(outsider.get_by_test_id("room-owner")).to_have_text("alice")
    outsider.close()

    # Alice invites bob from the owner panel; bob's open list shows the room on its own.
    alice.get_by_text("Manage room").click()
    expect(alice.locator("[data-testid=member-admin] li")).to_have_count(1)
    alice.get_by_test_id("invite-username").fill("bob")
    alice.get_by_test_id("invite-send").click()
    expect(alice.get_by_test_id("manage-status")).to_have_text("bob was invited.")
    expect(alice.locator("[data-testid=member-admin] li")).to_have_count(2)
    room = bob.locator("[data-room=team-plans]")
    expect(room.locator(".room-title")).to_have_text("Team Plans")
    expect(room.locator(".tag")).to_have_text("private")
    expect(room.get_by_test_id("member-count")).to_have_text("2 members")
    expect(room.get_by_test_id("unread")).to_have_count(0)

    # Alice writes: bob's badge and tab title count it without a reload.
    send(alice, "welcome, bob")
    expect(room.get_by_test_id("unread")).to_have_text("1")
    expect(bob).to_have_title("(1) Rooms")
    bob.screenshot(path=tmp_path / "rooms-list.png")

    # Bob opens the room and reads the message; the list's badge goes away.
    bob_room = bob_ctx.new_page()
    bob_room.goto(f"{server.base_url}/chat/team-plans/")
    expect_state(bob_room, "connected")
    expect(bob_room.locator("[data-testid=messages] li[data-seq] .text")).to_have_text(
        ["welcome, bob"]
    )
    expect(room.get_by_test_id("unread")).to_have_count(0)
    expect(bob).to_have_title("Rooms")
    alice.screenshot(path=tmp_path / "rooms-owner-panel.png")

    # Alice searches the room: the result links to the message, which the room page shows.
    search = alice_ctx.new_page()
    search.goto(alice.url)
    search.get_by_role("searchbox", name="Search this room").fill("WELCOME")
    search.get_by_role("searchbox", name="Search this room").press("Enter")
    results = search.locator("[data-testid=search-results] li")
    expect(results).to_have_count(1)
    expect(results.locator(".text")).to_have_text("welcome, bob")
    results.get_by_role("link").click()
    expect(search).to_have_url(re.compile(r"/chat/team-plans/#seq-1$"))
    expect(search.locator("[data-testid=messages] li[data-seq='1']")).to_have_class(
        re.compile(r"\bhighlight\b")
    )
    search.close()

    # Alice removes bob: his open room page is closed at once with the server's reason, and
    # the room leaves his list.
    alice.locator("[data-testid=member-admin] li[data-username=bob]").get_by_test_id(
        "remove-member"
    ).click()
    expect(alice.get_by_test_id("manage-status")).to_have_text("bob was removed.")
    expect(bob_room.get_by_test_id("notice")).to_have_text("You are not allowed in this room.")
    expect(bob.locator("[data-room=team-plans]")).to_have_count(0)
    alice_ctx.close()
    bob_ctx.close()
