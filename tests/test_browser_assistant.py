"""The assistant in headless Chromium against real daphne processes and the local fake
OpenAI-compatible server: the private panel (fetch + ReadableStream + AbortController) and
live replies in a room (growing bubble, stop button).

Every wait is a Playwright ``expect`` with a generous timeout; the only timing assertion is the
functional one (the model server saw its connection drop within a second of Stop).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browsers import WAIT_MS, chromium, submit_login
from tests.conftest import base_env, copy_sqlite
from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401
from tests.servers import DaphneServer

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

KEY = "sk-browser-3c2b1a0f9e8d"
LIVE = "li[data-testid=assistant-live]"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


def start_server(folder: Path, template: Path, **env: str) -> DaphneServer:
    path = folder / "db.sqlite3"
    copy_sqlite(template, path)
    return DaphneServer(base_env(SQLITE_PATH=str(path), **env)).start()


@pytest.fixture(scope="module")
def server(
    fake_openai_server: FakeOpenAI,  # noqa: F811
    sqlite_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DaphneServer]:
    daphne = start_server(
        tmp_path_factory.mktemp("browser-assistant"),
        sqlite_template,
        OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=fake_openai_server.base_url,
        CHAT_LLM_MAX_RETRIES="0",
        CHAT_ASSISTANT_RATE_LIMIT_REPLIES="1000",
    )
    yield daphne
    log = daphne.log_path.read_text(errors="replace")
    daphne.cleanup()
    assert KEY not in log


def logged_in_page(browser: Browser, server: DaphneServer, username: str, path: str) -> Page:
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(f"{server.base_url}{path}")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    submit_login(page, username)
    expect(page).to_have_url(re.compile(re.escape(path) + "$"))
    # The URL changes when the navigation commits, before the page's deferred scripts run.
    page.wait_for_load_state("load")
    return page


def ask_panel(page: Page, question: str) -> None:
    page.get_by_test_id("assistant-input").fill(question)
    page.get_by_test_id("assistant-send").click()


# --- the private panel ----------------------------------------------------------------------


def test_panel_streams_the_reply(
    browser: Browser,
    server: DaphneServer,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    tokens = ["Streaming", " <b>not bold</b>", " works", "\n", "é🙂", "."]
    fake_openai.scenario = Scenario(tokens=tokens, delay=0.05)
    page = logged_in_page(browser, server, "alice", "/chat/assistant/")
    expect(page.get_by_test_id("demo-label")).to_have_count(0)
    ask_panel(page, "Does it stream?")
    state = page.get_by_test_id("assistant-state")
    expect(state).to_have_attribute("data-state", "streaming")
    expect(state).to_have_attribute("data-state", "done")
    reply = page.locator("[data-testid=assistant-log] li.assistant .text")
    expect(reply).to_have_text("".join(tokens).replace("\n", " "), use_inner_text=False)
    assert reply.evaluate("el => el.textContent") == "".join(tokens)
    assert page.locator("[data-testid=assistant-log] b").count() == 0  # text, never HTML
    assert page.evaluate("window.assistantPanel.turns") == 2
    (record,) = fake_openai.records()
    assert record.messages == [{"role": "user", "content": "Does it stream?"}]
    assert KEY not in page.content()
    page.context.close()


def test_panel_stop_aborts_and_the_model_server_sees_the_hang_up(
    browser: Browser,
    server: DaphneServer,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    fake_openai.scenario = Scenario(tokens=["tick "] * 400, delay=0.03)
    page = logged_in_page(browser, server, "alice", "/chat/assistant/")
    ask_panel(page, "Count forever")
    reply = page.locator("[data-testid=assistant-log] li.assistant .text")
    expect(reply).to_contain_text("tick tick tick")
    stop = page.get_by_test_id("assistant-stop")
    expect(stop).to_be_visible()
    stopped_at = time.monotonic()
    stop.click()
    expect(page.get_by_test_id("assistant-state")).to_have_attribute("data-state", "stopped")
    expect(stop).to_be_hidden()
    assert fake_openai.wait_until(lambda f: bool(f.hangups()), 10)
    (record,) = fake_openai.records()
    assert record.hangup_at is not None and record.hangup_at - stopped_at < 1.0
    assert record.tokens_sent < 400
    # The partial reply stays in the conversation: the next question carries it.
    fake_openai.reset(Scenario(tokens=["ok"]))
    ask_panel(page, "And now?")
    expect(page.get_by_test_id("assistant-state")).to_have_attribute("data-state", "done")
    messages = fake_openai.records()[0].messages
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"].startswith("tick tick")
    page.context.close()


def test_panel_shows_upstream_errors(
    browser: Browser,
    server: DaphneServer,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    fake_openai.scenario = Scenario(status=401)
    page = logged_in_page(browser, server, "bob", "/chat/assistant/")
    ask_panel(page, "Hello?")
    expect(page.get_by_test_id("assistant-state")).to_have_attribute("data-state", "error")
    error = page.get_by_test_id("assistant-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("credentials")
    assert KEY not in page.content()
    page.context.close()


def test_panel_parser_handles_events_split_across_chunks(
    browser: Browser, server: DaphneServer
) -> None:
    page = logged_in_page(browser, server, "bob", "/chat/assistant/")
    chunks = [
        ": stream\n\nda",  # a comment, then half a field name
        'ta: {"content":"He',
        'llo"}\n',
        '\ndata: {"content":" wor',
        'ld"}\n\ndata: {"content":"!"}\n\nevent: error\r',  # several events, CRLF split
        '\ndata: {"code":"x","message":"m"}\r\n\r\n',
        "data: [DONE]\n\n",
    ]
    events = page.evaluate(
        """chunks => {
            const parser = window.assistantPanel.sseParser();
            const out = [];
            chunks.forEach((c, i) => out.push(...parser.push(c, i === chunks.length - 1)));
            return out;
        }""",
        chunks,
    )
    assert events == [
        {"event": "message", "data": '{"content":"Hello"}'},
        {"event": "message", "data": '{"content":" world"}'},
        {"event": "message", "data": '{"content":"!"}'},
        {
            "event": "error",
            "data": json.dumps({"code": "x", "message": "m"}, separators=(",", ":")),
        },
        {"event": "message", "data": "[DONE]"},
    ]
    page.context.close()


def test_panel_shows_the_demo_label_without_a_key(
    browser: Browser, sqlite_template: Path, tmp_path: Path
) -> None:
    demo = start_server(tmp_path, sqlite_template, CHAT_ASSISTANT_DEMO_DELAY_SECONDS="0.01")
    try:
        page = logged_in_page(browser, demo, "carol", "/chat/assistant/")
        expect(page.get_by_test_id("demo-label")).to_be_visible()
        ask_panel(page, "Are you real?")
        expect(page.get_by_test_id("assistant-state")).to_have_attribute("data-state", "done")
        expect(page.locator("li.assistant .text")).to_contain_text("offline demo assistant")
        expect(page.locator("li.assistant .text")).to_contain_text("Are you real?")
        page.context.close()
    finally:
        demo.cleanup()


# --- a room -----------------------------------------------------------------------------------


def test_room_reply_grows_for_everyone_and_stop_stops_it(
    browser: Browser,
    server: DaphneServer,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    fake_openai.scenario = Scenario(tokens=[f"w{i} " for i in range(500)], delay=0.03)
    alice = logged_in_page(browser, server, "alice", "/chat/lobby/")
    bob = logged_in_page(browser, server, "bob", "/chat/lobby/")
    for page in (alice, bob):
        expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "connected")
    alice.get_by_test_id("text").fill("@assistant count for us")
    alice.get_by_test_id("send").click()
    for page in (alice, bob):
        live = page.locator(LIVE)
        expect(live).to_have_count(1)
        expect(live.locator(".text")).to_contain_text("w0 w1 w2 w3")
    # Only the requester (or staff) gets a stop button.
    expect(bob.locator(f"{LIVE} [data-testid=assistant-stop]")).to_have_count(0)
    first = bob.locator(f"{LIVE} .text").text_content() or ""
    expect(bob.locator(f"{LIVE} .text")).not_to_have_text(first)  # still growing
    alice.locator(f"{LIVE} [data-testid=assistant-stop]").click()
    for page in (alice, bob):
        expect(page.locator(LIVE)).to_have_count(0)
        stored = page.locator("li[data-status=stopped]")
        expect(stored).to_have_count(1)
        expect(stored.locator(".author")).to_have_text("assistant")
        expect(stored.locator(".reply-status")).to_have_text("stopped")
        expect(stored.locator(".text")).to_contain_text("w0 w1 w2 w3")
    assert fake_openai.wait_until(lambda f: bool(f.hangups()), 10)
    assert fake_openai.records()[0].tokens_sent < 500
    # A reload shows the stored, stopped reply from history.
    bob.reload()
    expect(bob.locator("li[data-status=stopped] .reply-status")).to_have_text("stopped")
    alice.context.close()
    bob.context.close()


def test_room_reply_completes_and_a_late_joiner_sees_it_grow(
    browser: Browser,
    server: DaphneServer,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    # ~12 s of reply: carol's login and page load must fit in it on a loaded 2-core machine.
    tokens = [f"z{i} " for i in range(300)]
    fake_openai.scenario = Scenario(tokens=tokens, delay=0.04)
    alice = logged_in_page(browser, server, "alice", "/chat/lobby/")
    expect(alice.get_by_test_id("conn-state")).to_have_attribute("data-state", "connected")
    alice.get_by_test_id("text").fill("@assistant a long answer please")
    alice.get_by_test_id("send").click()
    expect(alice.locator(f"{LIVE} .text")).to_contain_text("z5 ")
    carol = logged_in_page(browser, server, "carol", "/chat/lobby/")
    # carol joins mid-reply: the text so far at once, then the rest.
    expect(carol.locator(f"{LIVE} .text")).to_contain_text("z0 z1 z2 z3 z4 z5")
    for page in (alice, carol):
        expect(page.locator(LIVE)).to_have_count(0, timeout=30_000)
        last = page.locator("[data-testid=messages] li[data-seq]").last
        expect(last.locator(".author")).to_have_text("assistant")
        assert last.locator(".text").text_content() == "".join(tokens)
    alice.context.close()
    carol.context.close()


def test_room_reply_that_fails_before_any_text_shows_why(
    browser: Browser,
    server: DaphneServer,
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    fake_openai.scenario = Scenario(status=401)
    bob = logged_in_page(browser, server, "bob", "/chat/lobby/")
    expect(bob.get_by_test_id("conn-state")).to_have_attribute("data-state", "connected")
    bob.get_by_test_id("text").fill("@assistant are you there?")
    bob.get_by_test_id("send").click()
    failed = bob.locator("li[data-stream-id][data-status=error]")
    expect(failed.locator(".reply-status")).to_have_text("failed")
    expect(failed.locator(".text")).to_contain_text("credentials")
    expect(failed.locator("[data-testid=assistant-stop]")).to_have_count(0)
    assert KEY not in bob.content()
    bob.context.close()
