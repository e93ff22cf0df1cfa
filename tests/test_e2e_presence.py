"""Presence, typing and read markers against real daphne processes (and Redis).

Each client runs a reader task that applies presence_state / presence_diff as the browser
would, so tests wait for the *resulting* state instead of counting frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from tests.conftest import base_env
from tests.servers import DaphneServer, RedisServer, decode_frames, login, ws_connect

pytestmark = [pytest.mark.e2e]

TIMEOUT = 10.0
# A short bound keeps the crash tests quick (the same code runs with the 60 s default); not
# shorter, so a loaded CI machine that delays a heartbeat does not expire a live socket.
PRESENCE_TIMEOUT = 10.0


class Watcher:
    """A socket in a room whose presence view follows the frames it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.online: dict[int, str] = {}
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, server: DaphneServer, cookie: str, room: str = "lobby") -> Watcher:
        watcher = cls(await ws_connect(server, f"/ws/chat/{room}/", cookie))
        await watcher.wait(lambda: any(f["type"] == "presence_state" for f in watcher.frames))
        return watcher

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                for frame in decode_frames(raw):
                    self.frames.append(frame)
                    self._apply(frame)
        except Exception:  # noqa: S110  (a dropped socket just ends the reader)
            pass
        finally:
            self.closed.set()

    def _apply(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "presence_state":
            self.online = {u["id"]: u["username"] for u in frame["users"]}
        elif frame["type"] == "presence_diff":
            for user in frame["joins"]:
                self.online[user["id"]] = user["username"]
            for user in frame["leaves"]:
                self.online.pop(user["id"], None)

    def names(self) -> set[str]:
        return set(self.online.values())

    def of_type(self, frame_type: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == frame_type]

    async def wait(
        self, check: Callable[[], bool], timeout: float = TIMEOUT, what: str = ""
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check():
            if loop.time() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what or 'condition'}; online={self.names()} "
                    f"last frames={self.frames[-5:]}"
                )
            await asyncio.sleep(0.05)

    async def wait_names(self, names: set[str], timeout: float = TIMEOUT) -> None:
        await self.wait(lambda: self.names() == names, timeout, f"online == {names}")

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), 5)
        self._reader.cancel()


async def presence_json(
    server: DaphneServer, cookie: str | None, room: str = "lobby"
) -> httpx.Response:
    headers = {"Cookie": cookie} if cookie else {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        return await client.get(f"/chat/{room}/presence/", headers=headers)


async def test_multi_tab_presence_and_the_json_view(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    server = start_daphne(sqlite_env)
    alice, bob = await login(server.base_url, "alice"), await login(server.base_url, "bob")
    watcher = await Watcher.open(server, bob)
    assert watcher.names() == {"bob"}
    tabs = [await Watcher.open(server, alice) for _ in range(3)]
    await watcher.wait_names({"alice", "bob"})

    response = await presence_json(server, bob)
    assert response.status_code == 200
    users = {u["username"]: u["connections"] for u in response.json()["users"]}
    assert users == {"alice": 3, "bob": 1}

    # Closing two of alice's tabs changes nothing for bob; closing the last one is a leave.
    diffs_before = len(watcher.of_type("presence_diff"))
    await tabs[0].close()
    await tabs[1].close()
    await asyncio.sleep(1.0)  # time for a (wrong) diff to arrive
    assert len(watcher.of_type("presence_diff")) == diffs_before
    assert watcher.names() == {"alice", "bob"}
    await tabs[2].close()
    await watcher.wait_names({"bob"})
    leaves = [u["username"] for d in watcher.of_type("presence_diff") for u in d["leaves"]]
    assert leaves == ["alice"]

    # Access rules of the JSON view.
    assert (await presence_json(server, None)).status_code == 401
    assert (await presence_json(server, bob, "secret")).status_code == 403
    assert (await presence_json(server, bob, "nowhere")).status_code == 404
    await watcher.close()


async def test_typing_and_read_markers_end_to_end(
    start_daphne: Callable[..., DaphneServer], sqlite_env: dict[str, str]
) -> None:
    server = start_daphne({**sqlite_env, "CHAT_READ_THROTTLE_SECONDS": "0.2"})
    alice_cookie, bob_cookie = (
        await login(server.base_url, "alice"),
        await login(server.base_url, "bob"),
    )
    alice = await Watcher.open(server, alice_cookie)
    bob = await Watcher.open(server, bob_cookie)
    await alice.send({"type": "typing", "active": True})
    await bob.wait(lambda: bool(bob.of_type("typing")), what="typing relay")
    assert bob.of_type("typing")[0]["user"]["username"] == "alice"
    await alice.send({"type": "message", "text": "hello", "client_id": "t1"})
    await bob.wait(lambda: bool(bob.of_type("message")), what="message")
    await bob.send({"type": "read", "seq": 1})
    await alice.wait(lambda: bool(alice.of_type("read")), what="read relay")
    assert alice.of_type("read")[0] == {
        "type": "read",
        "user": {"id": alice.of_type("read")[0]["user"]["id"], "username": "bob"},
        "seq": 1,
    }
    # A stale, lower marker is ignored; garbage is refused with bad_frame.
    await bob.send({"type": "read", "seq": 0})
    await bob.send({"type": "typing", "active": "maybe"})
    await bob.wait(lambda: bool(bob.of_type("error")), what="error")
    assert bob.of_type("error")[0]["code"] == "bad_frame"
    await asyncio.sleep(0.5)
    assert len(alice.of_type("read")) == 1
    assert alice.of_type("typing") == [], "typing is never echoed to the typist"
    await alice.close()
    await bob.close()


@pytest.fixture
def redis_env(sqlite_env: dict[str, str], redis_server: RedisServer) -> dict[str, str]:
    return {
        **sqlite_env,
        "REDIS_URL": redis_server.url,
        "CHAT_PRESENCE_TIMEOUT_SECONDS": str(PRESENCE_TIMEOUT),
    }


@pytest.mark.redis
async def test_presence_across_processes_and_sigkill(
    start_daphne: Callable[..., DaphneServer], redis_env: dict[str, str]
) -> None:
    one, two = start_daphne(redis_env), start_daphne(redis_env)
    alice, bob = await login(one.base_url, "alice"), await login(two.base_url, "bob")
    on_two = await Watcher.open(two, bob)
    on_one = [await Watcher.open(one, alice), await Watcher.open(one, alice)]
    await on_two.wait_names({"alice", "bob"})
    await on_one[0].wait_names({"alice", "bob"})
    # Typing crosses processes too.
    await on_one[0].send({"type": "typing", "active": True})
    await on_two.wait(lambda: bool(on_two.of_type("typing")), what="typing across processes")

    # The JSON view on either process sees both users.
    carol = await login(two.base_url, "carol")
    users = {u["username"] for u in (await presence_json(one, carol)).json()["users"]}
    assert users == {"alice", "bob"}

    # SIGKILL process one: no goodbye, no cleanup. Alice must vanish within the bound.
    one.kill()
    await on_two.wait_names({"bob"}, timeout=PRESENCE_TIMEOUT + 5)
    users = {u["username"] for u in (await presence_json(two, carol)).json()["users"]}
    assert users == {"bob"}
    await on_two.close()


@pytest.mark.redis
async def test_presence_reconverges_after_redis_restart(
    start_daphne: Callable[..., DaphneServer], redis_env: dict[str, str]
) -> None:
    server = RedisServer().start()
    try:
        env = {**redis_env, "REDIS_URL": server.url}
        one, two = start_daphne(env), start_daphne(env)
        alice, bob = await login(one.base_url, "alice"), await login(two.base_url, "bob")
        a = await Watcher.open(one, alice)
        b = await Watcher.open(two, bob)
        await a.wait_names({"alice", "bob"})
        await b.wait_names({"alice", "bob"})

        server.kill()
        await asyncio.sleep(1.0)
        server.start()  # same port, empty: every presence entry is gone

        # Both processes notice, re-add their sockets, and a newcomer sees everyone.
        carol = await login(one.base_url, "carol")
        deadline = asyncio.get_running_loop().time() + PRESENCE_TIMEOUT + 5
        while True:
            users = {u["username"] for u in (await presence_json(two, carol)).json()["users"]}
            if users == {"alice", "bob"}:
                break
            assert asyncio.get_running_loop().time() < deadline, f"presence stuck at {users}"
            await asyncio.sleep(0.25)
        await a.wait_names({"alice", "bob"}, timeout=PRESENCE_TIMEOUT + 5)
        await b.wait_names({"alice", "bob"}, timeout=PRESENCE_TIMEOUT + 5)
        # Chat still crosses processes after the restart. The pub/sub layer is at-most-once,
        # so a broadcast may be lost while connections re-establish; a client then learns of
        # the message from the pong's last_seq and resumes, as the browser client does.
        await a.send({"type": "message", "text": "after restart", "client_id": "r1"})

        def arrived() -> bool:
            return any(f.get("text") == "after restart" for f in b.of_type("message"))

        for _ in range(10):
            with contextlib.suppress(AssertionError):
                await b.wait(arrived, timeout=2.0)
                break
            await b.send({"type": "ping"})
            await b.wait(lambda: bool(b.of_type("pong")), what="pong")
            pong = b.of_type("pong")[-1]
            seen = max((f["seq"] for f in b.of_type("message")), default=0)
            if pong["last_seq"] > seen:
                await b.send({"type": "resume", "after": seen})
        assert arrived(), "the message never reached the other process's client"
        assert [f["text"] for f in b.of_type("message")].count("after restart") == 1
        await a.close()
        await b.close()
    finally:
        server.cleanup()


def test_base_env_has_no_redis() -> None:
    # Guard for the fixtures above: the single-process tests must not share Redis state.
    assert base_env()["REDIS_URL"] == ""
