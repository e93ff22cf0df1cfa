"""Older history in Chromium: scrolling up loads earlier pages with no duplicate and no gap,
also while live messages keep arriving."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Browser, expect

from tests.servers import DaphneServer, seed_messages
from tests.test_browser_chat import new_context, open_room, send, shown_seqs

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

SEEDED = 130


def test_scrolling_up_loads_older_pages_next_to_live_messages(
    browser: Browser,
    page_errors: list[str],
    start_daphne: Callable[..., DaphneServer],
    sqlite_env: dict[str, str],
) -> None:
    seed_messages(sqlite_env, "lobby", SEEDED)
    server = start_daphne(sqlite_env)
    page = open_room(new_context(browser, page_errors), server, "alice")
    # The socket's history: the last 50.
    expect(page.locator("[data-testid=messages] li[data-seq]")).to_have_count(50)
    assert shown_seqs(page) == list(range(SEEDED - 49, SEEDED + 1))
    load_older = page.get_by_test_id("load-older")
    expect(load_older).to_be_visible()

    # A live message arrives between pages: it goes at the bottom, once.
    send(page, "live while paging")
    expect(page.locator("[data-testid=messages] li[data-seq]")).to_have_count(51)

    # Scroll to the top: the next page (50 older) goes above, and the view stays put.
    page.locator("[data-testid=messages]").evaluate("el => { el.scrollTop = 0; }")
    expect(page.locator("[data-testid=messages] li[data-seq]")).to_have_count(101)
    # The rest by the button, until the beginning of the room.
    load_older.click()
    expect(page.locator("[data-testid=messages] li[data-seq]")).to_have_count(SEEDED + 1)
    expect(load_older).to_be_hidden()
    assert shown_seqs(page) == list(range(1, SEEDED + 2))
    texts = page.locator("[data-testid=messages] li[data-seq] .text").all_text_contents()
    assert texts[0] == "seeded 1"
    assert texts[-1] == "live while paging"
    # Nothing more to load, and a second click cannot add anything.
    page.evaluate("window.chatHistory.loadOlder()")
    assert shown_seqs(page) == list(range(1, SEEDED + 2))


def test_a_failed_page_can_be_retried(
    browser: Browser,
    page_errors: list[str],
    start_daphne: Callable[..., DaphneServer],
    sqlite_env: dict[str, str],
) -> None:
    seed_messages(sqlite_env, "lobby", 60)
    server = start_daphne(sqlite_env)
    page = open_room(new_context(browser, page_errors), server, "alice")
    expect(page.locator("[data-testid=messages] li[data-seq]")).to_have_count(50)
    page.route("**/chat/lobby/messages/**", lambda route: route.fulfill(status=503, body="{}"))
    page.get_by_test_id("load-older").click()
    expect(page.get_by_test_id("load-older")).to_have_text("Could not load older messages: retry")
    assert shown_seqs(page) == list(range(11, 61))
    page.unroute("**/chat/lobby/messages/**")
    page.get_by_test_id("load-older").click()
    expect(page.locator("[data-testid=messages] li[data-seq]")).to_have_count(60)
    assert shown_seqs(page) == list(range(1, 61))


def test_a_link_to_an_old_message_pages_back_to_it(
    browser: Browser,
    page_errors: list[str],
    start_daphne: Callable[..., DaphneServer],
    sqlite_env: dict[str, str],
) -> None:
    seed_messages(sqlite_env, "lobby", SEEDED)
    server = start_daphne(sqlite_env)
    context = new_context(browser, page_errors)
    open_room(context, server, "alice")  # logs in
    page = context.new_page()
    page.goto(f"{server.base_url}/chat/lobby/#seq-10")
    target = page.locator("[data-testid=messages] li[data-seq='10']")
    expect(target).to_have_class(re.compile(r"\bhighlight\b"), timeout=20_000)
    expect(target).to_be_in_viewport()
    # Paging stopped at the page holding it: no gap between it and the live end.
    seqs = shown_seqs(page)
    assert seqs == list(range(seqs[0], SEEDED + 1))
    assert seqs[0] <= 10
