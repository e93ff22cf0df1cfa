"""Phone, keyboard and screen readers in Chromium against a real daphne: the 390x844 layout
(measured: no horizontal overflow, the message column takes the width, the nav on one line,
the bell's dropdown inside the viewport), text contrast from the computed styles, aria-live
only for new live messages, Escape closes panels, and the composer before "load older" in
tab order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, ViewportSize, expect

from tests.browsers import submit_login, watched_context
from tests.servers import DaphneServer, seed_messages
from tests.test_browser_chat import (
    CONFIRMED_TEXTS,
    FAST_CLIENT,
    MESSAGES,
    new_context,
    open_room,
    screenshot_path,
    send,
)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PHONE: ViewportSize = {"width": 390, "height": 844}
MIN_CONTRAST = 4.5

# The WCAG contrast ratio of an element's text colour against the first opaque background
# behind it (an ancestor's), white if none is.
CONTRAST_JS = """
el => {
  const parse = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const ch = [r, g, b].map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * ch[0] + 0.7152 * ch[1] + 0.0722 * ch[2];
  };
  let bg = [255, 255, 255];
  for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
    const c = parse(getComputedStyle(node).backgroundColor);
    if (c.length >= 3 && (c.length < 4 || c[3] > 0.99)) { bg = c.slice(0, 3); break; }
  }
  const fg = parse(getComputedStyle(el).color);
  const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
}
"""


def phone_context(browser: Browser, page_errors: list[str]) -> BrowserContext:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    context.set_default_timeout(20_000)
    context.on("page", lambda page: page.on("pageerror", lambda e: page_errors.append(e.message)))
    context.add_init_script(f"window.CHAT_CONFIG = {json.dumps(FAST_CLIENT)};")
    return context


def open_phone_room(browser: Browser, page_errors: list[str], daphne: DaphneServer) -> Page:
    page = phone_context(browser, page_errors).new_page()
    page.goto(f"{daphne.base_url}/chat/lobby/")
    submit_login(page, "alice")
    expect(page).to_have_url(re.compile(r"/chat/lobby/$"))
    expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "connected")
    return page


def inside_viewport(page: Page, selector: str) -> bool:
    box = page.locator(selector).bounding_box()
    assert box is not None, selector
    return (
        box["x"] >= 0
        and box["y"] >= 0
        and box["x"] + box["width"] <= PHONE["width"]
        and box["y"] + box["height"] <= PHONE["height"]
    )


def test_phone_layout(
    browser: Browser,
    page_errors: list[str],
    daphne: DaphneServer,
    sqlite_env: dict[str, str],
    tmp_path: Path,
) -> None:
    seed_messages(sqlite_env, "lobby", 5)
    page = open_phone_room(browser, page_errors, daphne)
    send(page, "a " + "long" * 80 + " word and https://example.com/" + "x" * 200)
    expect(page.locator(CONFIRMED_TEXTS)).to_have_count(6)

    assert page.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
    column = page.locator(MESSAGES).bounding_box()
    assert column is not None and column["width"] >= 0.9 * PHONE["width"]
    # The newest message and the composer are on screen.
    assert inside_viewport(page, f"{MESSAGES} li[data-seq='6']")
    assert inside_viewport(page, "[data-testid=composer]")

    page.screenshot(path=screenshot_path(tmp_path, "chat-room-phone.png"))

    # The nav fits one line: every item on the same row, the bar one line high.
    tops = page.locator(".topbar nav > *:visible").evaluate_all(
        "els => els.map(e => Math.round(e.getBoundingClientRect().top + "
        "e.getBoundingClientRect().height / 2))"
    )
    assert max(tops) - min(tops) <= 4, tops
    assert page.evaluate(
        "(() => { const n = document.querySelector('.topbar nav'); "
        "return n.scrollWidth <= n.clientWidth + 1; })()"
    )

    # Members are behind a button; the panel opens inside the viewport; Escape closes it.
    members = page.locator(".members-panel")
    expect(members).to_be_hidden()
    toggle = page.get_by_test_id("members-toggle")
    toggle.click()
    expect(members).to_be_visible()
    page.screenshot(path=screenshot_path(tmp_path, "chat-room-phone-members.png"))
    expect(toggle).to_have_attribute("aria-expanded", "true")
    assert inside_viewport(page, ".members-panel")
    page.keyboard.press("Escape")
    expect(members).to_be_hidden()
    expect(toggle).to_be_focused()

    # The bell's dropdown stays inside the viewport; Escape closes it.
    page.get_by_test_id("notifications-button").click()
    panel = page.get_by_test_id("notifications-panel")
    expect(panel).to_be_visible()
    assert inside_viewport(page, "[data-testid=notifications-panel]")
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()
    assert page.evaluate("document.scrollingElement.scrollWidth <= innerWidth")


def test_text_contrast(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    seed_messages(sqlite_env, "lobby", 3)
    context = new_context(browser, page_errors)
    page = open_room(context, daphne, "alice")
    send(page, "mine, then edited")
    expect(page.locator(CONFIRMED_TEXTS)).to_have_count(4)
    mine = page.locator(f"{MESSAGES} li[data-seq='4']")
    mine.locator("button.edit").click()
    mine.locator("textarea.edit-text").fill("edited")
    mine.locator("textarea.edit-text").press("Enter")
    expect(mine.locator(".edited")).to_be_visible()
    # A message waiting for the connection shows its status.
    page.evaluate("window.chatClient.reconnectNow()")
    context.set_offline(True)
    send(page, "offline")
    expect(page.locator(f"{MESSAGES} li.pending .status")).to_be_visible()

    checked = {
        "time": f"{MESSAGES} li[data-seq] time",
        "pending status": f"{MESSAGES} li.pending .status",
        "edited mark": f"{MESSAGES} .edited",
        "day separator": "[data-testid=day-separator]",
        "room start": "[data-testid=room-start]",
        "connection state": "[data-testid=conn-state]",
        "member status": "[data-testid=members] .status",
        "member name": "[data-testid=members] li .name",
        "message text": CONFIRMED_TEXTS,
        "author": f"{MESSAGES} .author",
        "edit control": f"{MESSAGES} .controls button",
    }
    ratios = {}
    for name, selector in checked.items():
        items = page.locator(selector)
        assert items.count() > 0, name
        ratios[name] = min(items.evaluate_all(f"els => els.map({CONTRAST_JS})"))
    low = {name: round(r, 2) for name, r in ratios.items() if r < MIN_CONTRAST}
    assert low == {}, low
    context.set_offline(False)


def test_only_new_live_messages_are_announced(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    seed_messages(sqlite_env, "lobby", 60)
    alice = open_room(new_context(browser, page_errors), daphne, "alice")
    bob = open_room(new_context(browser, page_errors), daphne, "bob")
    expect(alice.locator(CONFIRMED_TEXTS)).to_have_count(50)
    alice.get_by_test_id("load-older").click()
    expect(alice.locator(CONFIRMED_TEXTS)).to_have_count(60)

    # The list is not a live region (history and older pages are not read out) ...
    live = alice.locator("[aria-live]")
    assert "messages" not in live.evaluate_all("els => els.map(e => e.dataset.testid)")
    assert alice.locator(f"{MESSAGES}").get_attribute("aria-live") is None
    announcer = alice.get_by_test_id("announcer")
    expect(announcer).to_have_attribute("aria-live", "polite")
    expect(announcer).to_have_text("")

    # ... new live messages are.
    send(bob, "news for alice")
    expect(alice.locator(CONFIRMED_TEXTS).last).to_have_text("news for alice")
    expect(announcer).to_have_text("bob: news for alice")
    # One's own message is not read back.
    send(alice, "my reply")
    expect(alice.locator(CONFIRMED_TEXTS).last).to_have_text("my reply")
    expect(announcer).to_have_text("bob: news for alice")


def test_composer_comes_before_load_older_in_tab_order(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    seed_messages(sqlite_env, "lobby", 60)
    page = open_room(new_context(browser, page_errors), daphne, "alice")
    expect(page.get_by_test_id("load-older")).to_be_visible()
    # Logged as focus arrives: focusing "load older" scrolls the list to the top, which loads
    # the older page at once (the button then goes), so the focus may not stay on it.
    page.evaluate(
        "window.focusLog = []; document.addEventListener('focusin', "
        "(e) => window.focusLog.push(e.target.dataset.testid || e.target.tagName))"
    )
    page.locator("body").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        if "load-older" in page.evaluate("window.focusLog"):
            break
    order: list[str] = page.evaluate("window.focusLog")
    assert "text" in order and "load-older" in order, order
    assert order.index("text") < order.index("send") < order.index("load-older")
    # Visually the composer stays below the messages.
    composer = page.get_by_test_id("composer").bounding_box()
    messages = page.locator(MESSAGES).bounding_box()
    assert composer is not None and messages is not None
    assert composer["y"] >= messages["y"] + messages["height"] - 1


def test_escape_closes_the_bell_on_a_desktop(
    browser: Browser, page_errors: list[str], daphne: DaphneServer
) -> None:
    page = watched_context(browser, page_errors).new_page()
    page.goto(f"{daphne.base_url}/accounts/login/")
    submit_login(page, "alice")
    page.wait_for_load_state("load")  # bell.js (deferred) handles the button from then on
    button = page.get_by_test_id("notifications-button")
    button.click()
    panel = page.get_by_test_id("notifications-panel")
    expect(panel).to_be_visible()
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()
    expect(button).to_have_attribute("aria-expanded", "false")
    expect(button).to_be_focused()


def test_escape_closes_the_owner_panel(
    browser: Browser, page_errors: list[str], daphne: DaphneServer
) -> None:
    page = watched_context(browser, page_errors).new_page()
    page.goto(f"{daphne.base_url}/chat/")
    submit_login(page, "alice")
    page.get_by_test_id("new-room-title").fill("Escape Test")
    page.get_by_test_id("new-room-create").click()
    expect(page).to_have_url(re.compile(r"/chat/escape-test/$"))
    page.wait_for_load_state("load")
    panel = page.get_by_test_id("owner-panel")
    panel.locator("summary").click()
    expect(page.get_by_test_id("rename-title")).to_be_visible()
    page.get_by_test_id("invite-username").focus()
    page.keyboard.press("Escape")
    expect(page.get_by_test_id("rename-title")).to_be_hidden()
    expect(panel.locator("summary")).to_be_focused()
