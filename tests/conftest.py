"""Shared fixtures: real redis-server, PostgreSQL and daphne processes for end-to-end tests.

With ``CI=true`` every skip is reported as a failure: a CI run that silently skips the
Redis, PostgreSQL or browser tests has not tested them.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser

from tests import servers
from tests.browsers import chromium
from tests.servers import DaphneServer, PostgresServer, RedisServer

# Tests post far more than 10 messages per 5 s; the rate-limit tests set their own limits.
UNLIMITED_RATE = "1000000"


def _ci() -> bool:
    return os.environ.get("CI") == "true"


def _skip_reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # On uvicorn, daphne's own behaviour is not there to test: deselected (not skipped, which
    # CI counts as a failure), and said so in the summary.
    if servers.asgi_server() != "uvicorn":
        return
    kept = [item for item in items if item.get_closest_marker("daphne_only") is None]
    dropped = [item for item in items if item.get_closest_marker("daphne_only") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report: pytest.TestReport = yield
    if report.skipped and _ci() and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"Skipped with CI=true, which counts as a failure: {_skip_reason(report.longrepr)}"
        )
    if report.failed and report.when in ("setup", "call", "teardown"):
        for server in servers.started_daphnes:
            report.sections.append(
                (f"daphne :{server.port} log ({server.log_path})", server.log_tail())
            )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    report: pytest.CollectReport = yield
    if report.skipped and _ci():
        report.outcome = "failed"
        report.longrepr = (
            f"Skipped with CI=true, which counts as a failure: {_skip_reason(report.longrepr)}"
        )
    return report


@pytest.fixture(autouse=True)
def _fresh_memory_limits() -> None:
    """Per-user counts in this process start empty for each test: user ids repeat in every
    test database, so one test's searches or edits must not count against the next's."""
    from realtime_kit import limit_stores

    limit_stores._lease_stores.pop("", None)
    limit_stores._rate_stores.pop("", None)


@pytest.fixture(autouse=True)
def _forget_daphne_logs() -> None:
    """Attach only this test's daphne logs to its failure report."""
    servers.started_daphnes.clear()


# --- databases -------------------------------------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    """Environment every test server gets, whatever the developer's shell exports."""
    env = {
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "DJANGO_DEBUG": "1",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "CHAT_RATE_LIMIT_MESSAGES": UNLIMITED_RATE,
        "CHAT_RATE_LIMIT_WINDOW_SECONDS": "5",
        # Tests share one Redis: a killed daphne of an earlier test must not leave presence
        # entries (ghosts until they expire) in the rooms of the next one.
        "CHAT_PRESENCE_KEY_PREFIX": f"test-{uuid.uuid4().hex[:12]}:presence",
        # Likewise for per-user limits: user ids repeat in every test database.
        "CHAT_REDIS_KEY_PREFIX": f"test-{uuid.uuid4().hex[:12]}:chat",
        "NOTIFICATIONS_REDIS_KEY_PREFIX": f"test-{uuid.uuid4().hex[:12]}:notifications",
    }
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated and seeded SQLite file, prepared once and copied for each test."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.sqlite3"
    servers.prepare_database(base_env(SQLITE_PATH=str(path)))
    return path


def copy_sqlite(source: Path, target: Path) -> None:
    # The backup API copies a consistent snapshot, WAL contents included.
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


@pytest.fixture
def sqlite_env(tmp_path: Path, sqlite_template: Path) -> dict[str, str]:
    """Environment of a fresh, prepared SQLite database for this test."""
    path = tmp_path / "chat.sqlite3"
    copy_sqlite(sqlite_template, path)
    return base_env(SQLITE_PATH=str(path))


@pytest.fixture
def rate_limit_env(sqlite_env: dict[str, str]) -> dict[str, str]:
    """``sqlite_env`` with the default 10 messages per window, and a window no test outlives."""
    return {
        **sqlite_env,
        "CHAT_RATE_LIMIT_MESSAGES": "10",
        "CHAT_RATE_LIMIT_WINDOW_SECONDS": "120",
    }


# --- servers ---------------------------------------------------------------------------------


@pytest.fixture
def start_daphne() -> Iterator[Callable[..., DaphneServer]]:
    """Factory: ``start_daphne(env)`` starts a daphne that is stopped after the test."""
    started: list[DaphneServer] = []

    def start(
        env: dict[str, str], port: int | None = None, args: list[str] | None = None
    ) -> DaphneServer:
        server = DaphneServer(env, port=port, args=args)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.cleanup()


@pytest.fixture
def daphne(start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]) -> DaphneServer:
    """One daphne on this test's SQLite database, in-memory channel layer."""
    return start_daphne(sqlite_env)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def postgres_env(postgres_server: PostgresServer) -> dict[str, str]:
    """Environment of a fresh, prepared PostgreSQL database for this test."""
    url = postgres_server.create_database(f"chat_{uuid.uuid4().hex[:12]}")
    env = base_env(DATABASE_URL=url)
    servers.prepare_database(env)
    return env


# --- browsers --------------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless Chromium for one test (tests/browsers.py)."""
    with chromium() as browser:
        yield browser


@pytest.fixture
def page_errors() -> Iterator[list[str]]:
    """Uncaught JavaScript errors of every page: the test fails if any script threw."""
    errors: list[str] = []
    yield errors
    assert errors == []


@pytest.fixture
def transactions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the batches ``services.post_messages`` was called with, in order (in-process
    tests of group commit: ``chat.ingest`` looks it up at each call)."""
    # Imported here: Django's apps are not ready when pytest imports this module.
    from chat import services
    from chat.services import PostRequest

    sizes: list[int] = []
    real = services.post_messages

    def counting(
        room_id: int, requests: list[PostRequest], broadcasts: list[Any] | None = None
    ) -> list[Any]:
        sizes.append(len(requests))
        return real(room_id, requests, broadcasts)

    monkeypatch.setattr(services, "post_messages", counting)
    return sizes
