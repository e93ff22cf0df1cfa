"""The notification bell in headless Chromium against a real daphne.

bell.js reads short backoff and election timings from ``window.NOTIFICATIONS_CONFIG`` (set by
an init script before the page's scripts run). Notifications are sent with the admin's form
over HTTP, like a staff member would. Every wait is a Playwright ``expect`` or
``wait_for_function`` with a generous timeout; nothing asserts on timing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.browsers import WAIT_MS, submit_login, watched_context
from tests.conftest import base_env, copy_sqlite
from tests.servers import TEST_PASSWORD, DaphneServer, run_django_script
from tests.test_e2e_notifications import _ADD_STAFF, STAFF

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

FAST_BELL = {"backoffBaseMs": 200, "backoffCapMs": 1000, "heartbeatMs": 200, "leaderTimeoutMs": 800}
COUNT = "[data-testid=notifications-count]"


@pytest.fixture
def env(tmp_path: Path, sqlite_template: Path) -> dict[str, str]:
    path = tmp_path / "bell.sqlite3"
    copy_sqlite(sqlite_template, path)
    env = base_env(SQLITE_PATH=str(path))
    run_django_script(_ADD_STAFF, env, STAFF, TEST_PASSWORD)
    return env


def new_context(browser: Browser, page_errors: list[str], **bell: object) -> BrowserContext:
    config = json.dumps({**FAST_BELL, **bell})
    return watched_context(browser, page_errors, f"window.NOTIFICATIONS_CONFIG = {config};")


def log_in(context: BrowserContext, server: DaphneServer, username: str) -> Page:
    page = context.new_page()
    page.goto(f"{server.base_url}/chat/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    submit_login(page, username)
    expect(page).to_have_url(re.compile(r"/chat/$"))
    return page


def open_tab(context: BrowserContext, server: DaphneServer) -> Page:
    page = context.new_page()
    page.goto(f"{server.base_url}/chat/")
    expect(page.locator(COUNT)).to_be_attached()
    return page


def admin_send(server: DaphneServer, username: str, title: str, **fields: str) -> None:
    """Send with the admin's form over HTTP, as staff would."""
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        client.get("/accounts/login/")
        login = {"username": STAFF, "password": TEST_PASSWORD}
        response = client.post(
            "/accounts/login/", data={**login, "csrfmiddlewaretoken": client.cookies["csrftoken"]}
        )
        assert response.status_code == 302
        data = {"audience": "users", "usernames": username, "title": title, "level": "info"}
        response = client.post(
            "/admin/notifications/notification/send/",
            data={**data, **fields},
            headers={"X-CSRFToken": client.cookies["csrftoken"]},
        )
        assert response.status_code == 302, response.text[:1000]


def bell(page: Page, prop: str) -> object:
    return page.evaluate(f"window.notificationsBell && window.notificationsBell.{prop}")


def wait_connected_leader(page: Page) -> None:
    page.wait_for_function(
        "window.notificationsBell && window.notificationsBell.isLeader"
        " && window.notificationsBell.connected",
        timeout=WAIT_MS,
    )


def wait_one_leader(pages: list[Page]) -> Page:
    """Wait until exactly one of the tabs leads and holds an open stream; return it."""
    deadline_ms = WAIT_MS
    step_ms = 100
    while deadline_ms > 0:
        leaders = [p for p in pages if bell(p, "isLeader")]
        if len(leaders) == 1 and bell(leaders[0], "connected"):
            return leaders[0]
        pages[0].wait_for_timeout(step_ms)
        deadline_ms -= step_ms
    raise AssertionError(f"leaders: {[bell(p, 'isLeader') for p in pages]}")


def test_bell_updates_live(
    browser: Browser,
    page_errors: list[str],
    start_daphne: Callable[..., DaphneServer],
    env: dict[str, str],
) -> None:
    server = start_daphne(env)
    page = log_in(new_context(browser, page_errors), server, "alice")
    wait_connected_leader(page)
    count = page.locator(COUNT)
    expect(count).to_have_attribute("data-count", "0")
    expect(count).to_be_hidden()

    admin_send(server, "alice", "Hello <b>bell</b>", body="two\nlines", url="/chat/lobby/")
    expect(count).to_have_attribute("data-count", "1")
    expect(count).to_have_text("1")
    expect(count).to_be_visible()

    page.get_by_test_id("notifications-button").click()
    items = page.locator("[data-testid=notifications-list] li")
    expect(items).to_have_count(1)
    # Text, never HTML: the title shows its angle brackets.
    expect(items.first.locator(".notif-title")).to_have_text("Hello <b>bell</b>")
    assert items.first.locator("b").count() == 0
    expect(items.first).to_have_class("unread")
    assert items.first.locator("a").get_attribute("href") == "/chat/lobby/"

    admin_send(server, "alice", "Second")
    expect(count).to_have_attribute("data-count", "2")
    expect(items).to_have_count(2)
    expect(items.first.locator(".notif-title")).to_have_text("Second")

    page.get_by_test_id("notifications-read-all").click()
    expect(count).to_have_attribute("data-count", "0")
    expect(count).to_be_hidden()
    # bob's notifications never reach alice's bell.
    admin_send(server, "bob", "Not for alice")
    admin_send(server, "alice", "Third")
    expect(count).to_have_attribute("data-count", "1")
    expect(items.first.locator(".notif-title")).to_have_text("Third")
    assert "Not for alice" not in page.locator("[data-testid=notifications-list]").inner_text()


@pytest.mark.parametrize("election", ["locks", "heartbeats"])
def test_tabs_share_one_stream(
    browser: Browser,
    page_errors: list[str],
    start_daphne: Callable[..., DaphneServer],
    env: dict[str, str],
    election: str,
) -> None:
    # One stream per user: a second tab opening its own stream would be refused (429), so
    # the follower tab can only see notifications through the leader.
    server = start_daphne({**env, "NOTIFICATIONS_MAX_STREAMS_PER_USER": "1"})
    context = new_context(browser, page_errors, useWebLocks=election == "locks")
    first = log_in(context, server, "alice")
    wait_connected_leader(first)
    second = open_tab(context, server)
    tabs = [first, second]
    leader = wait_one_leader(tabs)
    follower = second if leader is first else first
    assert bell(leader, "election") == election
    assert bell(follower, "connects") == 0, "the follower never opened a stream"

    admin_send(server, "alice", "To every tab")
    for tab in tabs:
        expect(tab.locator(COUNT)).to_have_attribute("data-count", "1")
    assert [bell(t, "isLeader") for t in tabs].count(True) == 1

    # The leader goes away: the other tab takes over the stream (the server has released
    # the old one, or the cap of 1 would refuse it) and resumes where the leader stopped.
    leader.close()
    wait_connected_leader(follower)
    admin_send(server, "alice", "After the handover")
    expect(follower.locator(COUNT)).to_have_attribute("data-count", "2")
    follower.get_by_test_id("notifications-button").click()
    titles = follower.locator("[data-testid=notifications-list] .notif-title")
    expect(titles).to_have_text(["After the handover", "To every tab"])

    # A tab opened now follows the new leader.
    third = open_tab(context, server)
    expect(third.locator(COUNT)).to_have_attribute("data-count", "2")
    admin_send(server, "alice", "Third tab too")
    for tab in (follower, third):
        expect(tab.locator(COUNT)).to_have_attribute("data-count", "3")
    assert [bell(t, "isLeader") for t in (follower, third)] == [True, False]
    assert bell(third, "connects") == 0
