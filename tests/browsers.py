"""Headless Chromium for the browser tests: Debian's chromium driven by Playwright."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from playwright.sync_api import Browser, BrowserContext, Error, Page, sync_playwright

from tests.servers import TEST_PASSWORD, require_binary

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


# Every wait is a Playwright expect or wait with this generous timeout; nothing asserts timing.
WAIT_MS = 20_000


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Launch /usr/bin/chromium (``playwright install`` cannot download a browser here)."""
    executable = require_binary("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def watched_context(
    browser: Browser, page_errors: list[str], *init_scripts: str, timezone_id: str | None = None
) -> BrowserContext:
    """A context whose pages report uncaught JavaScript errors into ``page_errors`` (in
    ``timezone_id``, else the machine's zone)."""

    def watch(page: Page) -> None:
        def record(error: Error) -> None:
            page_errors.append(f"{page.url}: {error.message}")

        page.on("pageerror", record)

    context = browser.new_context(timezone_id=timezone_id)
    context.on("page", watch)
    context.set_default_timeout(WAIT_MS)
    for script in init_scripts:
        context.add_init_script(script)
    return context


def submit_login(page: Page, username: str, password: str = TEST_PASSWORD) -> None:
    """Fill in and submit the login form the page shows."""
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("form[action='/accounts/login/'] button[type=submit]")
