"""How messages look in Chromium against a real daphne: rich text built from plain text (links,
code, bold, italic, mentions, several lines), groups of one author, day separators, relative
times, the start of the room, and the "new messages" pill when the reader is scrolled up."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from tests.servers import DaphneServer, run_django_script, seed_messages
from tests.test_browser_chat import CONFIRMED_TEXTS, MESSAGES, new_context, open_room, send
from tests.test_browser_edits import edit

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

RICH = (
    "see https://example.com/a?b=1. and mailto:bob@example.com or javascript:alert(1) "
    "<b>not markup</b> `x = 1` **loud** _soft_ snake_case_name @bob @carol\n"
    "```\nfor i in x:\n    print(i)\n```"
)


def message(page: Page, seq: int) -> Locator:
    return page.locator(f"{MESSAGES} li[data-seq='{seq}']")


def stored_text(env: dict[str, str], seq: int) -> str:
    script = textwrap.dedent(
        """
        import django, sys
        django.setup()
        from chat.models import Message
        print(Message.objects.get(room__slug="lobby", seq=int(sys.argv[1])).text, end="")
        """
    )
    return run_django_script(script, env, str(seq))


def test_rich_text_is_built_from_plain_text(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    alice = open_room(new_context(browser, page_errors), daphne, "alice")
    bob = open_room(new_context(browser, page_errors), daphne, "bob")
    send(alice, RICH)
    for page in (alice, bob):
        expect(page.locator(CONFIRMED_TEXTS)).to_have_count(1)
    text = message(bob, 1).locator(".text")

    links = text.locator("a")
    expect(links).to_have_count(2)
    # The sentence's full stop is not part of the link.
    expect(links.nth(0)).to_have_attribute("href", "https://example.com/a?b=1")
    expect(links.nth(1)).to_have_attribute("href", "mailto:bob@example.com")
    for i in range(2):
        expect(links.nth(i)).to_have_attribute("target", "_blank")
        expect(links.nth(i)).to_have_attribute("rel", "noopener noreferrer")
    # Nothing else is a link or markup: these stay text.
    expect(text).to_contain_text("javascript:alert(1)")
    expect(text).to_contain_text("<b>not markup</b>")
    expect(text.locator("b")).to_have_count(0)

    expect(text.locator(":scope > code")).to_have_text(["x = 1"])
    expect(text.locator("strong")).to_have_text(["loud"])
    expect(text.locator("em")).to_have_text(["soft"])  # not the underscores inside a word
    expect(text).to_contain_text("snake_case_name")
    expect(text.locator("pre code")).to_have_text("for i in x:\n    print(i)")

    # Mentions: the reader's own name stands out from others'.
    expect(text.locator(".mention")).to_have_text(["@bob", "@carol"])
    expect(text.locator(".mention.me")).to_have_text(["@bob"])
    expect(message(alice, 1).locator(".mention.me")).to_have_count(0)

    # The editor starts from the plain text, and an edit is rendered the same way.
    message(alice, 1).locator("button.edit").click()
    expect(message(alice, 1).locator("textarea.edit-text")).to_have_value(RICH)
    message(alice, 1).locator("button", has_text="cancel").click()
    edit(alice, 1, "now **bold** at https://example.org")
    for page in (alice, bob):
        expect(message(page, 1).locator(".text strong")).to_have_text("bold")
        expect(message(page, 1).locator(".text a")).to_have_attribute(
            "href", "https://example.org/"
        )


def test_shift_enter_is_a_new_line_and_enter_sends(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    alice = open_room(new_context(browser, page_errors), daphne, "alice")
    box = alice.get_by_test_id("text")
    box.click()
    box.type("first line")
    box.press("Shift+Enter")
    box.type("second line")
    expect(alice.locator(CONFIRMED_TEXTS)).to_have_count(0)
    box.press("Enter")
    expect(alice.locator(CONFIRMED_TEXTS)).to_have_text(["first line\nsecond line"])
    expect(box).to_have_value("")
    assert stored_text(sqlite_env, 1) == "first line\nsecond line"
    # Shown on two lines.
    height = message(alice, 1).locator(".text").evaluate("el => el.getClientRects()[0].height")
    line = (
        message(alice, 1)
        .locator(".text")
        .evaluate("el => parseFloat(getComputedStyle(el).lineHeight) || 16")
    )
    assert height > 1.5 * line


_SEED_TIMED = textwrap.dedent(
    """
    import django, json, sys
    django.setup()
    from datetime import timedelta
    from django.contrib.auth import get_user_model
    from django.utils import timezone
    from chat.models import Message, Room

    now = timezone.now()
    room = Room.objects.get(slug="lobby")
    users = {u.username: u for u in get_user_model().objects.all()}
    rows = json.loads(sys.argv[1])
    for seq, (name, minutes_ago) in enumerate(rows, start=1):
        m = Message.objects.create(room=room, seq=seq, user=users[name], text=f"m{seq}")
        Message.objects.filter(pk=m.pk).update(created_at=now - timedelta(minutes=minutes_ago))
    Room.objects.filter(pk=room.pk).update(last_seq=len(rows))
    """
)

TWO_DAYS_MIN = 2 * 24 * 60


def midday_zone() -> str:
    """A fixed-offset zone where it is about noon now, so that the rows below (48 h to 47 h 40
    min old, and 30 min old) straddle no midnight whenever the suite runs (run between 23:40
    and 00:30 in the machine's zone, the test saw three days instead of two)."""
    offset = 12 - datetime.now(UTC).hour  # local hour = UTC hour + offset, -11..+12
    return f"Etc/GMT{-offset:+d}" if offset else "Etc/GMT"  # Etc/GMT-5 is UTC+5


def test_groups_day_separators_times_and_the_start_of_the_room(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    rows = [
        ("carol", TWO_DAYS_MIN),  # 1: a new day
        ("carol", TWO_DAYS_MIN - 2),  # 2: same author within 5 min: grouped
        ("bob", TWO_DAYS_MIN - 3),  # 3: another author
        ("bob", TWO_DAYS_MIN - 20),  # 4: same author, 17 min later: not grouped
        ("bob", 30),  # 5: today: a separator
    ]
    run_django_script(_SEED_TIMED, sqlite_env, json.dumps(rows))
    context = new_context(browser, page_errors, timezone_id=midday_zone())
    page = open_room(context, daphne, "alice")
    expect(page.locator(CONFIRMED_TEXTS)).to_have_count(5)

    grouped = [
        "grouped" in (message(page, seq).get_attribute("class") or "") for seq in range(1, 6)
    ]
    assert grouped == [False, True, False, False, False]
    # A grouped message's name is only there for screen readers (a 1 px clipped box).
    widths = [
        message(page, seq).locator(".author").evaluate("e => e.offsetWidth") for seq in (2, 3)
    ]
    assert widths[0] <= 1 < widths[1]

    separators = page.get_by_test_id("day-separator")
    expect(separators).to_have_count(2)
    expect(separators.nth(1)).to_have_text("Today")
    # Each separator sits right above the first message of its day.
    after = separators.evaluate_all("els => els.map(e => e.nextElementSibling.dataset.seq)")
    assert after == ["1", "5"]

    # The oldest message is on screen: the room's start is marked above it.
    start = page.get_by_test_id("room-start")
    expect(start).to_be_visible()
    assert start.evaluate(
        "el => !!(el.compareDocumentPosition(document.querySelector(\"li[data-seq='1']\")) "
        "& Node.DOCUMENT_POSITION_FOLLOWING)"
    )

    # Relative time, with the absolute time on hover.
    expect(message(page, 5).locator("time")).to_have_text("30 min ago")
    send(page, "fresh")
    expect(message(page, 6).locator("time")).to_have_text("just now")
    title = message(page, 6).locator("time").get_attribute("title") or ""
    assert re.search(r"\d{4}", title) and re.search(r"\d{1,2}:\d{2}", title), title


def test_new_messages_pill_when_scrolled_up(
    browser: Browser, page_errors: list[str], daphne: DaphneServer, sqlite_env: dict[str, str]
) -> None:
    seed_messages(sqlite_env, "lobby", 60)
    alice = open_room(new_context(browser, page_errors), daphne, "alice")
    bob = open_room(new_context(browser, page_errors), daphne, "bob")
    expect(alice.locator(CONFIRMED_TEXTS)).to_have_count(50)
    # On open the newest message is fully visible.
    assert alice.locator(MESSAGES).evaluate(
        """list => {
            const last = list.querySelector("li[data-seq='60']").getBoundingClientRect();
            const box = list.getBoundingClientRect();
            return last.bottom <= box.bottom + 1 && last.top >= box.top;
        }"""
    )
    pill = alice.get_by_test_id("new-messages")
    jump = alice.get_by_test_id("jump-bottom")
    expect(pill).to_be_hidden()
    expect(jump).to_be_hidden()

    alice.locator(MESSAGES).evaluate("list => { list.scrollTop = list.scrollHeight / 3; }")
    expect(jump).to_be_visible()
    send(bob, "while you were reading")
    send(bob, "and another")
    expect(alice.locator(CONFIRMED_TEXTS).last).to_have_text("and another")
    expect(pill).to_have_text("2 new messages")
    pill.click()
    expect(pill).to_be_hidden()
    expect(jump).to_be_hidden()
    assert alice.locator(MESSAGES).evaluate(
        "l => l.scrollHeight - l.scrollTop - l.clientHeight < 40"
    )

    # At the bottom, new messages just scroll in: no pill.
    send(bob, "at the bottom")
    expect(alice.locator(CONFIRMED_TEXTS).last).to_have_text("at the bottom")
    expect(pill).to_be_hidden()


def test_a_stored_demo_reply_keeps_its_demo_mark(
    browser: Browser,
    page_errors: list[str],
    start_daphne: Callable[..., DaphneServer],
    sqlite_env: dict[str, str],
) -> None:
    server = start_daphne(
        {**sqlite_env, "OPENAI_API_KEY": "", "CHAT_ASSISTANT_DEMO_DELAY_SECONDS": "0.01"}
    )
    alice = open_room(new_context(browser, page_errors), server, "alice")
    send(alice, "@assistant what is a seq?")
    reply = message(alice, 2)
    expect(reply.locator(".text")).to_contain_text("offline demo assistant")
    expect(reply.locator(".author")).to_have_text("assistant")
    expect(reply.get_by_test_id("demo-label")).to_have_text("demo")
    # Only the question is quoted, not the room's "alice: @assistant" framing.
    expect(reply.locator(".text")).to_contain_text("“what is a seq?”")
    expect(reply.locator(".text")).not_to_contain_text("alice:")
    # After a reload it comes from history, still marked.
    alice.reload()
    expect(message(alice, 2).get_by_test_id("demo-label")).to_have_text("demo")
    expect(message(alice, 1).get_by_test_id("demo-label")).to_have_count(0)
