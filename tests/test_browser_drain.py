"""A server restart as people see it, in headless Chromium against the runner.

One SIGTERM while a room reply and a panel reply are streaming: the room shows the stored reply
marked interrupted and says the server is restarting, then reconnects by itself once the
server is back, showing every message once; the panel shows its reply as interrupted, with the
text so far, and can ask again. tests/test_e2e_drain.py checks the same on the wire.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browsers import chromium, submit_login, watched_context
from tests.conftest import copy_sqlite
from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401
from tests.servers import DaphneServer
from tests.test_e2e_assistant_room import room_env

# The drain is our runner's (realtime_kit.server, over daphne).
pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.daphne_only]

DRAIN_SECONDS = 5.0
EXIT_BOUND_SECONDS = DRAIN_SECONDS + 5.0
LIVE = "li[data-testid=assistant-live]"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


def open_page(browser: Browser, page_errors: list[str], server: DaphneServer, path: str) -> Page:
    page = watched_context(browser, page_errors).new_page()
    page.goto(f"{server.base_url}{path}")
    submit_login(page, "alice")
    expect(page).to_have_url(re.compile(re.escape(path) + "$"))
    page.wait_for_load_state("load")
    return page


def test_restart_mid_reply_shows_interrupted_and_the_room_reconnects_by_itself(
    browser: Browser,
    page_errors: list[str],
    sqlite_template: Path,
    tmp_path: Path,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    fake_openai.scenario = Scenario(tokens=[f"w{i} " for i in range(400)], delay=0.05)
    path = tmp_path / "db.sqlite3"
    copy_sqlite(sqlite_template, path)
    server = DaphneServer(room_env(fake_openai, path), args=["--drain-timeout", "5"])
    try:
        server.start()
        room = open_page(browser, page_errors, server, "/chat/lobby/")
        expect(room.get_by_test_id("conn-state")).to_have_attribute("data-state", "connected")
        room.get_by_test_id("text").fill("@assistant count for us")
        room.get_by_test_id("send").click()
        expect(room.locator(f"{LIVE} .text")).to_contain_text("w0 w1 w2")
        panel = open_page(browser, page_errors, server, "/chat/assistant/")
        panel.get_by_test_id("assistant-input").fill("Count for me")
        panel.get_by_test_id("assistant-send").click()
        reply = panel.locator("[data-testid=assistant-log] li.assistant")
        expect(reply.locator(".text")).to_contain_text("w0 w1 w2")

        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        stored = room.locator("li[data-status=interrupted]")
        expect(stored.locator(".reply-status")).to_have_text("interrupted: the server restarted")
        expect(stored.locator(".text")).to_contain_text("w0 w1 w2")
        expect(room.locator(LIVE)).to_have_count(0)
        expect(room.get_by_test_id("notice")).to_contain_text("The server is restarting")
        state = panel.get_by_test_id("assistant-state")
        expect(state).to_have_attribute("data-state", "interrupted")
        expect(reply.locator(".status")).to_have_text("interrupted: the server restarted")
        expect(reply.locator(".text")).to_contain_text("w0 w1 w2")
        expect(panel.get_by_test_id("assistant-error")).to_contain_text("ask again")
        assert server.proc.wait(EXIT_BOUND_SECONDS) == 0

        server.start()  # the same port: the page reconnects by itself
        expect(room.get_by_test_id("conn-state")).to_have_attribute("data-state", "connected")
        room.get_by_test_id("text").fill("back again")
        room.get_by_test_id("send").click()
        expect(room.locator("li[data-seq]").last.locator(".text")).to_have_text("back again")
        seqs = room.locator("li[data-seq]").evaluate_all("els => els.map(e => e.dataset.seq)")
        assert seqs == [str(seq) for seq in range(1, len(seqs) + 1)], seqs
        assert len(seqs) == 3  # the request, the interrupted reply, the new message
        expect(stored).to_have_count(1)
        fake_openai.scenario = Scenario(tokens=["again."], delay=0.0)
        panel.get_by_test_id("assistant-input").fill("Once more")
        panel.get_by_test_id("assistant-send").click()
        expect(state).to_have_attribute("data-state", "done")
        assert panel.evaluate("window.assistantPanel.turns") == 4  # the partial reply is kept
    finally:
        server.cleanup()
