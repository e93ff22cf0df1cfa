"""Clients for fault-injection tests: they behave like the browser client under faults.

``Follower`` is a reader that does what chat.js does to lose nothing: it shows a message only
when its seq is the next one (a lower seq is a duplicate: dropped; a higher one waits behind
the gap, which it asks to replay with ``resume``), pings and resumes when a pong's
``last_seq`` is ahead of what it has shown, and reconnects with ``?after=`` when the socket
closes. ``seqs`` is what it showed, so a test checks exactly-once and order on it;
``duplicates`` counts the frames the server sent again (after a resume that crossed a live
frame, as the protocol allows). ``Writer`` posts messages at a steady pace, retrying an
unanswered or refused send with the same ``client_id`` (idempotent), and records what was
acknowledged, so a test can check that nothing acked is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from websockets.asyncio.client import ClientConnection

from tests.servers import DaphneServer, decode_frames, ws_connect

PING_SECONDS = 0.5  # faster than the browser's 25 s: a test waits for recovery, not for idling
RECONNECT_SECONDS = 0.5


class Follower:
    """A room reader that resumes and reconnects as the browser does (see module docstring)."""

    def __init__(self, server: DaphneServer, cookie: str, room: str = "lobby") -> None:
        self.server = server
        self.cookie = cookie
        self.room = room
        self.seqs: list[int] = []  # the seqs shown, in order
        self.duplicates = 0
        self._held: dict[int, dict[str, Any]] = {}
        self.online: dict[int, str] = {}
        self.reconnects = 0
        self.closes: list[int | None] = []
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    @property
    def last(self) -> int:
        return max(self.seqs, default=0)

    async def start(self) -> Follower:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), 15)
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()

    def names(self) -> set[str]:
        return set(self.online.values())

    async def _run(self) -> None:
        while True:
            query = f"?after={self.last}" if self.seqs else ""
            path = f"/ws/chat/{self.room}/{query}"
            try:
                self._ws = await ws_connect(self.server, path, self.cookie)
            except Exception:
                await asyncio.sleep(RECONNECT_SECONDS)
                continue
            self._connected.set()
            pinger = asyncio.create_task(self._ping(self._ws))
            try:
                async for raw in self._ws:
                    for frame in decode_frames(raw):
                        await self._apply(self._ws, frame)
            except Exception:  # noqa: S110  (a dropped socket: reconnect below)
                pass
            finally:
                pinger.cancel()
                self.closes.append(self._ws.close_code)
            self.reconnects += 1
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _ping(self, ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            while True:
                await asyncio.sleep(PING_SECONDS)
                await ws.send(json.dumps({"type": "ping"}))

    async def _apply(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "message":
            seq = frame["seq"]
            if seq <= self.last:
                self.duplicates += 1
            elif seq == self.last + 1:
                self.seqs.append(seq)
                while self.last + 1 in self._held:
                    self._held.pop(self.last + 1)
                    self.seqs.append(self.last + 1)
            else:
                if not self._held:
                    await ws.send(json.dumps({"type": "resume", "after": self.last}))
                self._held[seq] = frame
        elif kind == "pong" and frame.get("last_seq", 0) > self.last:
            # A broadcast was lost (the channel layer is at most once): fetch what is missing.
            await ws.send(json.dumps({"type": "resume", "after": self.last}))
        elif kind == "presence_state":
            self.online = {u["id"]: u["username"] for u in frame["users"]}
        elif kind == "presence_diff":
            for user in frame["joins"]:
                self.online[user["id"]] = user["username"]
            for user in frame["leaves"]:
                self.online.pop(user["id"], None)


class Writer:
    """Posts ``prefix-N`` messages every ``interval`` seconds until stopped (see module doc)."""

    def __init__(
        self, server: DaphneServer, cookie: str, prefix: str, interval: float, mention: str = ""
    ) -> None:
        self.server = server
        self.mention = mention  # appended to each text, e.g. "@bob"
        self.cookie = cookie
        self.prefix = prefix
        self.interval = interval
        self.acked: dict[str, int] = {}  # client_id -> seq
        self.errors: list[str] = []  # error codes received (the send is retried)
        self.unanswered = 0  # sends that got no answer in time (retried on a new socket)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Writer:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 60)

    async def _run(self) -> None:
        index = 0
        ws: ClientConnection | None = None
        while not self._stop.is_set():
            client_id = f"{self.prefix}-{index}"
            try:
                if ws is None:
                    ws = await ws_connect(self.server, "/ws/chat/lobby/", self.cookie)
                if await self._post(ws, client_id):
                    index += 1
            except Exception:
                self.unanswered += 1
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await ws.close()
                ws = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    async def _post(self, ws: ClientConnection, client_id: str) -> bool:
        """Send once; True when acked. Errors and silence leave it for a retry."""
        text = f"{client_id} at {time.time():.3f} {self.mention}"
        await ws.send(json.dumps({"type": "message", "text": text, "client_id": client_id}))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
            except TimeoutError:
                break
            for frame in decode_frames(raw):
                if frame.get("client_id") != client_id:
                    continue
                if frame["type"] == "ack":
                    self.acked[client_id] = frame["seq"]
                    return True
                if frame["type"] == "error":
                    self.errors.append(frame["code"])
                    return False
        self.unanswered += 1
        raise ConnectionError(f"no answer to {client_id}")
