"""Faults around room replies of the assistant, on real daphne processes and a real
OpenAI-compatible server.

- The daphne streaming a reply is SIGKILLed: the other process takes the reply over within the
  takeover bound (chat/assistant/runs.py), stores the text of the dead process's last
  heartbeat as ``interrupted``, and every member still connected sees ``assistant.end`` and the
  stored message; the dead process's members leave presence within its bound.
- The model server misbehaves in the middle of a reply (slow, connection reset, garbage, an
  in-stream error, a 5xx): the reply ends with its partial text stored and an error status,
  and nothing leaks: the model server sees every stream closed, the process's running-reply
  gauge and its event loop's task count come back to where they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_openai import FakeOpenAI, Scenario, fake_openai, fake_openai_server  # noqa: F401
from tests.servers import DaphneServer, RedisServer, login
from tests.test_e2e_assistant_room import KEY, Member, assemble, fresh_db, room_env, stored_rows

pytestmark = [pytest.mark.e2e]

HEARTBEAT = 0.5  # CHAT_ASSISTANT_HEARTBEAT_SECONDS of these processes
TAKEOVER = 2.0  # CHAT_ASSISTANT_TAKEOVER_SECONDS
PRESENCE_TIMEOUT = 3.0  # CHAT_PRESENCE_TIMEOUT_SECONDS
WAIT = 30.0  # bound on any wait: generous for a loaded 2-core machine
METRICS_TOKEN = "metrics-faults-7d1e"


def run_rows(path: Path) -> list[tuple[str, str]]:
    """(stream_id, text) of every AssistantRun row."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT stream_id, text FROM chat_assistantrun").fetchall()


async def until_true(check: object, what: str, timeout: float = WAIT) -> float:
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def pair(
    redis_server: RedisServer,
    fake_openai_server: FakeOpenAI,  # noqa: F811
    sqlite_template: Path,
    tmp_path: Path,
) -> Iterator[tuple[DaphneServer, DaphneServer, Path]]:
    path = fresh_db(sqlite_template, tmp_path)
    env = room_env(
        fake_openai_server,
        path,
        REDIS_URL=redis_server.url,
        CHAT_ASSISTANT_HEARTBEAT_SECONDS=str(HEARTBEAT),
        CHAT_ASSISTANT_TAKEOVER_SECONDS=str(TAKEOVER),
        CHAT_PRESENCE_TIMEOUT_SECONDS=str(PRESENCE_TIMEOUT),
    )
    owner = DaphneServer(env).start()
    other = DaphneServer(env).start()
    yield owner, other, path
    for server in (owner, other):
        log = server.log_path.read_text(errors="replace")
        server.cleanup()
        assert KEY not in log


@pytest.mark.redis
async def test_killed_owner_reply_is_taken_over_and_stored_as_interrupted(
    pair: tuple[DaphneServer, DaphneServer, Path],
    fake_openai: FakeOpenAI,  # noqa: F811
) -> None:
    owner, other, path = pair
    tokens = [f"t{i} " for i in range(1000)]
    fake_openai.scenario = Scenario(tokens=tokens, delay=0.02)  # ~20 s: outlives the kill
    alice = await Member.open(owner, await login(owner.base_url, "alice"))
    bob = await Member.open(other, await login(other.base_url, "bob"))
    state = await bob.frame("presence_state")
    assert {u["username"] for u in state["users"]} == {"alice", "bob"}
    sid = await alice.ask()
    await bob.frame("assistant.start", stream_id=sid)
    # The owner has recorded some text: that is what a takeover can keep.
    await until_true(lambda: any(text for _, text in run_rows(path)), "a heartbeat with text")
    owner.kill()
    killed = time.monotonic()
    end = await bob.frame("assistant.end", stream_id=sid)
    took_over = time.monotonic() - killed
    assert end["status"] == "interrupted" and end["seq"] is not None
    message = bob.message(end["seq"])
    assert message["status"] == "interrupted" and message["user"]["username"] == "assistant"
    # The stored text is the last heartbeat's: a non-empty prefix of what bob saw stream.
    seen = assemble(bob.of_stream(sid))
    assert message["text"] and seen.startswith(message["text"])
    assert "".join(tokens).startswith(seen)
    assert stored_rows(path)[-1][1:] == ("assistant", message["text"], "interrupted")
    assert run_rows(path) == []
    # Once, not once per sweeper: the other process's sweeps go on and find nothing more.
    await asyncio.sleep(TAKEOVER)
    assert [f for f in bob.of_stream(sid) if f["type"] == "assistant.end"] == [end]
    assert [row for row in stored_rows(path) if row[2] == message["text"]] == [
        (end["seq"], "assistant", message["text"], "interrupted")
    ]
    # alice's only socket died with its process: she leaves bob's presence within the bound
    # (possibly before the takeover: look from the start of bob's log).
    bob.cursor = 0
    diff = await bob.wait_for(
        lambda f: f["type"] == "presence_diff" and "alice" in {u["username"] for u in f["leaves"]},
        timeout=PRESENCE_TIMEOUT + WAIT,
    )
    left = time.monotonic() - killed
    assert left < PRESENCE_TIMEOUT + WAIT and diff["leaves"]
    # The model server saw the dead process's stream end (the kernel closed the socket).
    assert await asyncio.to_thread(fake_openai.wait_idle, WAIT)
    print(f"\nafter SIGKILL: assistant.end in {took_over:.2f} s, presence leave by {left:.2f} s")
    await bob.close()


# --- the model server misbehaving mid-reply ------------------------------------------------------


@pytest.fixture(scope="module")
def single(
    fake_openai_server: FakeOpenAI,  # noqa: F811
    sqlite_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DaphneServer, Path]]:
    path = fresh_db(sqlite_template, tmp_path_factory.mktemp("assistant-faults"))
    env = room_env(fake_openai_server, path, CHAT_METRICS_TOKEN=METRICS_TOKEN)
    server = DaphneServer(env).start()
    yield server, path
    log = server.log_path.read_text(errors="replace")
    server.cleanup()
    assert KEY not in log
    assert "Task was destroyed but it is pending" not in log


def gauge(body: str, name: str, labelled: bool = False) -> float:
    """The value of an unlabelled sample, or of the ``kind="room"`` one (``labelled``)."""
    assert f"# TYPE {name} gauge" in body, f"{name} missing from /metrics"
    pattern = (
        rf'^{re.escape(name)}{{kind="room"}} ([0-9.e+-]+)$'
        if labelled
        else (rf"^{re.escape(name)} ([0-9.e+-]+)$")
    )
    match = re.search(pattern, body, re.MULTILINE)
    if match is None:
        # prometheus_client lists a labelled sample once it was first set: none ran yet.
        assert labelled, f"{name} has no sample"
        return 0.0
    return float(match.group(1))


async def scrape(server: DaphneServer) -> str:
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    async with httpx.AsyncClient(headers=headers, timeout=10) as client:
        response = await client.get(f"{server.base_url}/metrics")
    assert response.status_code == 200
    return response.text


async def settled(server: DaphneServer, tasks_at_most: float) -> tuple[float, float]:
    """(running replies, event-loop tasks), once the tasks are back to ``tasks_at_most``."""
    deadline = time.monotonic() + WAIT
    while True:
        body = await scrape(server)
        streams = gauge(body, "chat_assistant_streams_running", labelled=True)
        tasks = gauge(body, "realtime_event_loop_tasks")
        if (streams == 0 and tasks <= tasks_at_most) or time.monotonic() > deadline:
            return streams, tasks
        await asyncio.sleep(0.1)


PARTIAL = ["Half", " a", " reply", " lost"]


@pytest.mark.parametrize(
    ("scenario", "code"),
    [
        # Slow: the model stops sending for longer than CHAT_LLM_IDLE_TIMEOUT_SECONDS.
        (Scenario(tokens=PARTIAL, delay=0.01, stall_after=3), "upstream_timeout"),
        (Scenario(tokens=PARTIAL, reset_after=3), "upstream_unavailable"),
        (Scenario(tokens=PARTIAL, malformed_after=3), "upstream_bad_response"),
        # A server error reported inside the stream (its status line was 200 already).
        (Scenario(tokens=PARTIAL, error_chunk_after=3), "upstream_error"),
    ],
    ids=["slow", "reset", "garbage", "error-chunk"],
)
async def test_model_server_failing_mid_reply_stores_partial_text_and_leaks_nothing(
    single: tuple[DaphneServer, Path],
    fake_openai: FakeOpenAI,  # noqa: F811
    scenario: Scenario,
    code: str,
) -> None:
    server, path = single
    alice = await Member.open(server, await login(server.base_url, "alice"))
    # With alice's socket open and nothing running: what the process normally holds.
    _, baseline_tasks = await settled(server, float("inf"))
    fake_openai.scenario = scenario
    sid = await alice.ask()
    end = await alice.frame("assistant.end", stream_id=sid)
    assert end["status"] == "error" and end["error"]["code"] == code, end
    assert alice.message(end["seq"])["status"] == "error"
    assert stored_rows(path)[-1][1:] == ("assistant", "Half a reply", "error")
    assert run_rows(path) == []
    # Counted leaks: upstream connections, running replies, event-loop tasks.
    assert await asyncio.to_thread(fake_openai.wait_idle, WAIT), "an upstream stream leaked"
    streams, tasks = await settled(server, baseline_tasks)
    assert streams == 0, "a running reply leaked"
    assert tasks <= baseline_tasks, f"{tasks - baseline_tasks:g} event-loop tasks leaked"
    await alice.close()


@pytest.mark.parametrize("status", [500, 503])
async def test_model_server_5xx_ends_the_reply_with_an_error_and_leaks_nothing(
    single: tuple[DaphneServer, Path],
    fake_openai: FakeOpenAI,  # noqa: F811
    status: int,
) -> None:
    server, path = single
    alice = await Member.open(server, await login(server.base_url, "alice"))
    _, baseline_tasks = await settled(server, float("inf"))
    before = len(stored_rows(path))
    fake_openai.scenario = Scenario(status=status)
    sid = await alice.ask()
    end = await alice.frame("assistant.end", stream_id=sid)
    assert end["status"] == "error" and end["seq"] is None
    assert end["error"]["code"] == "upstream_error", end
    assert len(stored_rows(path)) == before + 1  # the request only: there was no text
    assert run_rows(path) == []
    assert await asyncio.to_thread(fake_openai.wait_idle, WAIT)
    streams, tasks = await settled(server, baseline_tasks)
    assert streams == 0 and tasks <= baseline_tasks
    await alice.close()
